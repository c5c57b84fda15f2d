"""farm.publish.tree: building a libvirt tree and running its capability tests, for real.

The slow tests build libvirt 11.3.0 (a writable checkout, see tests/libvirt_worktree.py) and run
qemucapabilitiestest, domaincapstest and qemuxmlconftest with and without VIR_TEST_REGENERATE_OUTPUT.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

from farm.errors import FarmError
from farm.publish import tree as lt
from tests.libvirt_worktree import LibvirtWorktree, libvirt_worktree, libvirt_worktree_session  # noqa: F401

CAPS = Path("tests") / "qemucapabilitiesdata"


# ------------------------------------------------------------------------------- fast: no build


def test_capability_tests_of_11_3_0(libvirt11: Path):
    assert lt.capability_tests(libvirt11) == ["qemucapabilitiestest", "domaincapstest", "qemuxmlconftest"]


def test_capability_tests_of_9_0_0_use_the_old_names(libvirt9: Path):
    assert lt.capability_tests(libvirt9) == [
        "qemucapabilitiestest", "domaincapstest", "qemuxml2argvtest", "qemuxml2xmltest"]


def test_setup_options_exist_in_the_tree(libvirt11: Path, libvirt9: Path):
    args = lt.meson_setup_args(libvirt11)
    assert "-Ddriver_qemu=enabled" in args and "-Dtests=enabled" in args and "-Ddocs=disabled" in args
    assert "-Dnbdkit=enabled" in args
    defined = lt.tree_options(libvirt11)
    assert all(a.removeprefix("-D").split("=")[0] in defined for a in args if a not in lt.MESON_BUILTIN_OPTIONS)
    old = lt.meson_setup_args(libvirt9)  # 9.0.0 has no nbdkit option: it is left out, not an error
    assert "-Ddriver_qemu=enabled" in old and not any(a.startswith("-Dnbdkit") for a in old)


def test_not_a_tree(tmp_path: Path):
    (tmp_path / "README").write_text("not libvirt\n")
    for call in (lambda: lt.capability_tests(tmp_path),
                 lambda: lt.build(tmp_path, tmp_path / "build"),
                 lambda: lt.regenerate_and_verify(tmp_path, tmp_path / "build")):
        with pytest.raises(lt.TreeError, match=r"not a libvirt source tree: it has no meson.build"):
            call()
    assert not (tmp_path / "build").exists()


def test_tree_without_capability_tests(tmp_path: Path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "meson.build").write_text("project('libvirt')\n")
    (tmp_path / "tests" / "meson.build").write_text("tests += [ { 'name': 'virstringtest' } ]\n")
    assert lt.capability_tests(tmp_path) == []
    with pytest.raises(lt.TreeError, match="defines none of qemucapabilitiestest"):
        lt.regenerate_and_verify(tmp_path, tmp_path / "build")


def _fake_tree(root: Path, meson_build: str) -> Path:
    """A meson project that looks like libvirt to farm (its options, a capability test)."""
    root.mkdir()
    (root / "tests").mkdir()
    (root / "meson.build").write_text(textwrap.dedent(meson_build))
    (root / "meson_options.txt").write_text(textwrap.dedent("""\
        option('tests', type: 'feature', value: 'auto', description: 'tests')
        option('driver_qemu', type: 'feature', value: 'auto', description: 'QEMU')
        option('docs', type: 'feature', value: 'auto', description: 'docs')
    """))
    (root / "tests" / "meson.build").write_text("tests += [ { 'name': 'qemucapabilitiestest' } ]\n")
    return root


def test_missing_build_dependency_is_a_clear_error(tmp_path: Path):
    tree = _fake_tree(tmp_path / "src", """\
        project('libvirt', 'c')
        dependency('farm-no-such-library-1', required: get_option('driver_qemu'))
    """)
    lines: list[str] = []
    with pytest.raises(lt.BuildError) as e:
        lt.build(tree, tmp_path / "build", progress=lines.append)
    message = str(e.value)
    assert "\n" not in message
    assert "farm-no-such-library-1" in message and "apt-get build-dep libvirt" in message
    assert str(tmp_path / "build" / "meson-logs" / "meson-log.txt") in message
    assert any("farm-no-such-library-1" in line for line in lines)  # meson's output was streamed


def test_missing_meson_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tree = _fake_tree(tmp_path / "src", "project('libvirt')\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(lt.BuildError, match=r"meson not found on PATH: install it \(apt-get install meson\)"):
        lt.build(tree, tmp_path / "build")


def test_build_dir_of_another_tree(tmp_path: Path):
    tree = _fake_tree(tmp_path / "src", "project('libvirt')\n")
    other = _fake_tree(tmp_path / "other", "project('libvirt')\n")
    assert lt.setup(tree, tmp_path / "build") is True
    assert lt.setup(tree, tmp_path / "build") is False  # configured: reused
    with pytest.raises(lt.BuildError, match="is configured for .*/src, not .*/other"):
        lt.setup(other, tmp_path / "build")
    with pytest.raises(lt.TreeError, match="defines no test qemucapabilitiestest"):
        lt.run_tests(tmp_path / "build", ["qemucapabilitiestest"], regenerate=False)


def test_build_dir_that_is_not_one(tmp_path: Path):
    tree = _fake_tree(tmp_path / "src", "project('libvirt')\n")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "precious.txt").write_text("mine\n")
    with pytest.raises(lt.BuildError, match="exists and is not a meson build directory"):
        lt.setup(tree, tmp_path / "build")
    assert (tmp_path / "build" / "precious.txt").exists()


# ------------------------------------------------------------------------- slow: real libvirt


@pytest.fixture
def built(libvirt_worktree: LibvirtWorktree) -> LibvirtWorktree:  # noqa: F811
    """The worktree, reset, with its capability tests built (incrementally after the first time)."""
    lt.build(libvirt_worktree.tree, libvirt_worktree.build_dir)
    return libvirt_worktree


@pytest.mark.slow
def test_worktree_is_a_pristine_checkout(libvirt_worktree: LibvirtWorktree):  # noqa: F811
    w = libvirt_worktree
    assert w.changed() == []
    assert lt.capability_tests(w.tree) == ["qemucapabilitiestest", "domaincapstest", "qemuxmlconftest"]
    assert not w.build_dir.is_relative_to(w.tree)
    (w.tree / CAPS / "caps_9.2.0_x86_64.xml").unlink()
    (w.tree / "junk").write_text("x\n")
    assert sorted(w.changed()) == ["junk", str(CAPS / "caps_9.2.0_x86_64.xml")]
    w.reset()
    assert w.changed() == []


@pytest.mark.slow
def test_build_is_incremental(built: LibvirtWorktree):
    lines: list[str] = []
    lt.build(built.tree, built.build_dir, progress=lines.append)
    assert not any(line.startswith("meson setup") for line in lines)
    assert any("no work to do" in line for line in lines)


@pytest.mark.slow
def test_regenerate_recreates_a_deleted_output(built: LibvirtWorktree):
    xml = CAPS / "caps_9.2.0_x86_64.xml"
    (built.tree / xml).unlink()
    lines: list[str] = []
    run = lt.regenerate_and_verify(built.tree, built.build_dir, progress=lines.append)
    assert (built.tree / xml).read_bytes() == (built.pristine / xml).read_bytes()
    # every output the three tests regenerate is what libvirt 11.3.0 ships: the build options
    # (nbdkit, disabled drivers and features) do not change or skip any of them
    assert built.changed() == []
    assert run.ok and not run.regenerate and run.failed == []
    assert {r.name: r.result for r in run.results} == {
        "qemucapabilitiestest": "OK", "domaincapstest": "OK", "qemuxmlconftest": "OK"}
    assert run.log.is_file()
    assert any(lt.REGENERATE_ENV in line for line in lines)


@pytest.mark.slow
def test_damaged_expected_output_fails_without_regeneration(built: LibvirtWorktree,
                                                           monkeypatch: pytest.MonkeyPatch):
    xml = built.tree / CAPS / "caps_9.2.0_x86_64.xml"
    lines = xml.read_text().splitlines(keepends=True)
    flag = next(i for i, line in enumerate(lines) if "<flag name=" in line)
    xml.write_text("".join(lines[:flag] + lines[flag + 1:]))
    run = lt.run_tests(built.build_dir, ["qemucapabilitiestest", "qemuxmlconftest"], regenerate=False)
    assert not run.ok
    assert run.failed == ["qemucapabilitiestest"]  # (domaincapstest, reading this .xml, would fail too)
    assert {r.name: r.result for r in run.results} == {"qemucapabilitiestest": "FAIL", "qemuxmlconftest": "OK"}
    caps = run.results[[r.name for r in run.results].index("qemucapabilitiestest")]
    assert caps.cases and f"VIR_TEST_RANGE={caps.cases}" in caps.output  # libvirt's own hint
    assert run.describe_failures() == f"qemucapabilitiestest (cases {caps.cases})"
    assert "qemucapabilitiestest" in run.tail and "FAIL" in run.tail
    assert run.log.is_file()

    monkeypatch.setenv(lt.REGENERATE_ENV, "1")  # a stray setting in the caller's environment is ignored
    assert not lt.run_tests(built.build_dir, ["qemucapabilitiestest"], regenerate=False).ok
    monkeypatch.delenv(lt.REGENERATE_ENV)
    assert xml.read_text().count("<flag name=") == len([ln for ln in lines if "<flag name=" in ln]) - 1

    # regenerating rewrites the file, and (libvirt's way) still reports the difference it found
    regenerated = lt.run_tests(built.build_dir, ["qemucapabilitiestest"], regenerate=True)
    assert regenerated.regenerate and regenerated.failed == ["qemucapabilitiestest"]
    assert xml.read_bytes() == (built.pristine / CAPS / "caps_9.2.0_x86_64.xml").read_bytes()
    assert lt.run_tests(built.build_dir, ["qemucapabilitiestest"], regenerate=False).ok


@pytest.mark.slow
def test_broken_dump_fails_regeneration_naming_the_test(built: LibvirtWorktree):
    replies = built.tree / CAPS / "caps_9.2.0_x86_64.replies"
    text = replies.read_text()
    replies.write_text(text[: len(text) // 2])  # truncated mid-conversation
    with pytest.raises(lt.TestsFailed) as e:
        lt.regenerate_and_verify(built.tree, built.build_dir, tests=["qemucapabilitiestest"])
    message = str(e.value)
    assert isinstance(e.value, FarmError) and "\n" not in message
    assert re.search(r"^qemucapabilitiestest \(cases [0-9-,]+\) still failed in", message)
    assert "after regenerating their outputs (VIR_TEST_REGENERATE_OUTPUT=1); log: " in message
    assert e.value.run.log.is_file() and str(e.value.run.log) in message


@pytest.mark.slow
def test_unknown_test_name(built: LibvirtWorktree):
    with pytest.raises(lt.TreeError, match="defines no test qemuxml2argvtest"):
        lt.run_tests(built.build_dir, ["qemuxml2argvtest"], regenerate=False)


def test_no_shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Commands are argument lists: a tree path with shell metacharacters is just a path."""
    tree = _fake_tree(tmp_path / "src; touch pwned", "project('libvirt')\n")
    assert lt.setup(tree, tmp_path / "build $(x)") is True
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()
    shutil.rmtree(tmp_path / "build $(x)")
