"""farm: a probe farm for libvirt's QEMU capabilities test data."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it from here)


def version() -> str:
    """The installed distribution's version, else (run from a source tree) ``__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("farm")
    except PackageNotFoundError:
        return __version__
