"""farm: a probe farm for libvirt's QEMU capabilities test data."""

__version__ = "0.1.0"
