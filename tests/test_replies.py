"""The .replies toolkit on libvirt's own data (Debian's libvirt 9.0.0 and 11.3.0 source packages).

No hand-made dumps: damaged inputs are copies of real ones, damaged in one place.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from farm.caps import dump
from farm.caps.names import DumpName, Scheme
from farm.cli import main as farm

# Verdicts libvirt's own trees are known to have.
REAL_ARCHS = {"x86_64", "aarch64", "s390x", "ppc64", "loongarch64"}
FAKE_ARCHS = {"riscv64", "sparc", "armv7l", "ppc"}


def run_farm(capsys, *argv: str) -> tuple[int, str]:
    code = farm(list(argv))
    return code, capsys.readouterr().out


def replies_tool(libvirt11: Path, *files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(libvirt11 / "scripts" / "qemu-replies-tool.py"), *map(str, files)],
        capture_output=True,
        text=True,
    )


def test_every_dump_of_both_trees_validates_in_its_own_layout(data9, data11):
    for directory, layout in ((data9, dump.Layout.old), (data11, dump.Layout.current)):
        files = sorted(directory.glob("*.replies"))
        assert len(files) == 29
        for f in files:
            d = dump.load(f)
            assert d.valid, d.errors()
            assert d.layout is layout, f


def test_validate_agrees_with_qemu_replies_tool_file_by_file(libvirt11, data11, tmp_path):
    """Real files and damaged copies: our verdict equals the tool's, file by file."""
    files = sorted(data11.glob("*.replies"))
    damaged = list(_damaged_copies(data11 / "caps_9.2.0_x86_64.replies", tmp_path).values())
    for f in files + damaged:
        tool_ok = replies_tool(libvirt11, f).returncode == 0
        assert dump.load(f).valid == tool_ok, f


def _damaged_copies(source: Path, tmp_path: Path) -> dict[str, Path]:
    text = source.read_text()
    lines = text.split("\n")
    chunks = text[:-1].split("\n\n")

    def swap_ids(t: str) -> str:
        return t.replace('"libvirt-2"', '"libvirt-X"').replace('"libvirt-3"', '"libvirt-2"').replace(
            '"libvirt-X"', '"libvirt-3"'
        )

    schema = '"meta-type": "command",'
    damages = {
        "truncated": "\n".join(lines[: len(lines) // 2]) + "\n",
        "reply-removed": "\n\n".join(chunks[:-1]) + "\n",
        "ids-swapped": swap_ids(text),
        "garbage-appended": text + "garbage\n",
        "schema-extra-key": text.replace(schema, schema + '\n      "x-unhandled": "yes",', 1),
        "reindented": text.replace('\n  "execute"', '\n   "execute"', 1),
        "blank-line-doubled": text.replace("\n\n", "\n\n\n", 1),
        "no-final-newline": text[:-1],
    }
    out = {}
    for what, body in damages.items():
        path = tmp_path / what / source.name
        path.parent.mkdir()
        path.write_text(body)
        out[what] = path
    return out


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", "invalid JSON"),
        ("reply-removed", "has no reply"),
        ("ids-swapped", "has id 'libvirt-3', expected 'libvirt-2'"),
        ("garbage-appended", "invalid JSON"),
        ("schema-extra-key", "unhandled key 'x-unhandled'"),
        ("reindented", "not in the current layout"),
        ("blank-line-doubled", "extra blank line"),
        ("no-final-newline", "missing final newline"),
    ],
)
def test_damaged_copies_are_rejected_with_file_line_reasons(data11, tmp_path, capsys, damage, message):
    path = _damaged_copies(data11 / "caps_9.2.0_x86_64.replies", tmp_path)[damage]
    before = path.read_bytes()
    code, out = run_farm(capsys, "replies", "validate", str(path))
    assert code == 1
    first = out.splitlines()[0]
    file_, line, reason = first.split(":", 2)
    assert file_ == str(path)
    assert int(line) >= 1
    assert message in reason
    # the line named is where the damage is
    if damage == "schema-extra-key":
        assert '"name"' in path.read_text().split("\n")[int(line) - 1]
    if damage == "reindented":
        assert path.read_text().split("\n")[int(line) - 1] == '   "execute": "qmp_capabilities",'
    assert path.read_bytes() == before  # input untouched
    code, out = run_farm(capsys, "replies", "inspect", "--json", str(path))
    assert code == 1 and json.loads(out)[0]["verdict"] == "invalid"


def test_fmt_refuses_what_it_cannot_keep(data11, tmp_path, capsys):
    path = _damaged_copies(data11 / "caps_9.2.0_x86_64.replies", tmp_path)["reply-removed"]
    before = path.read_bytes()
    code, out = run_farm(capsys, "replies", "fmt", str(path))
    assert code == 1 and "unformattable" in out and "has no reply" in out
    assert path.read_bytes() == before


def test_name_disagreeing_with_content_is_invalid(data11, tmp_path, capsys):
    wrong_arch = tmp_path / "caps_9.2.0_aarch64.replies"
    shutil.copy(data11 / "caps_9.2.0_x86_64.replies", wrong_arch)
    wrong_version = tmp_path / "caps_9.1.0_x86_64.replies"
    shutil.copy(data11 / "caps_9.2.0_x86_64.replies", wrong_version)
    dev_snapshot = tmp_path / "caps_9.2.0_s390x.replies"  # QEMU 9.2.50 belongs under 10.0.0
    shutil.copy(data11 / "caps_10.0.0_s390x.replies", dev_snapshot)
    code, out = run_farm(capsys, "replies", "inspect", "--json", str(wrong_arch), str(wrong_version), str(dev_snapshot))
    assert code == 1
    a, v, s = json.loads(out)
    assert a["verdict"] == v["verdict"] == s["verdict"] == "invalid"
    assert "named aarch64 but QEMU's target is x86_64" in a["reasons"]
    assert "named 9.1.0 but QEMU reports 9.2.0: belongs under 9.2.0" in v["reasons"]
    assert any("QEMU reports 9.2.50: belongs under 9.3.0 or 10.0.0" in r for r in s["reasons"])


def test_a_variant_must_show_its_feature(data11, tmp_path, capsys):
    """A plain dump filed as +amdsev or +sgx: its own replies say SEV and SGX were not there."""
    for variant in ("amdsev", "sgx", "inteltdx"):
        shutil.copy(data11 / "caps_9.2.0_x86_64.replies", tmp_path / f"caps_9.2.0_x86_64+{variant}.replies")
    code, out = run_farm(capsys, "replies", "inspect", "--json", *(str(tmp_path / f"caps_9.2.0_x86_64+{v}.replies")
                                                                   for v in ("amdsev", "sgx", "inteltdx")))
    assert code == 1
    sev, sgx, tdx = json.loads(out)
    assert sev["verdict"] == sgx["verdict"] == "invalid"
    assert "named +amdsev but query-sev-capabilities failed: SEV: Failed to open /dev/sev: No such file or directory" \
        in sev["reasons"]
    assert "named +sgx but query-sgx-capabilities failed: Could not open '/dev/sgx_vepc': No such file or directory" \
        in sgx["reasons"]
    assert tdx["verdict"] == "real"  # libvirt 11.3.0's probe does not ask: a warning, not a verdict
    assert "+inteltdx not confirmed: the probe did not ask query-tdx-capabilities" in tdx["warnings"]


def test_verdicts_match_what_libvirts_trees_are(data9, data11, capsys):
    files = sorted(data9.glob("*.replies")) + sorted(data11.glob("*.replies"))
    code, out = run_farm(capsys, "replies", "inspect", "--json", *map(str, files))
    assert code == 0  # fakes of riscv64, sparc, armv7l, ppc are normal: not alarming
    results = json.loads(out)
    assert len(results) == 58
    seen = set()
    for r in results:
        assert {"file", "qemu_version", "arch", "variant", "accelerator", "sessions", "verdict", "reasons", "warnings"} <= r.keys()
        seen.add(r["arch"])
        if r["arch"] in REAL_ARCHS:
            assert r["verdict"] == "real", r
            assert r["sessions"] == 2
        else:
            assert r["arch"] in FAKE_ARCHS
            assert r["verdict"] == "fake" and r["sessions"] == 1 and r["accelerator"] == "tcg"
            assert "normal for" in r["reasons"][0]
    assert seen == REAL_ARCHS | FAKE_ARCHS
    by_name = {Path(r["file"]).name: r for r in results}
    hvf = by_name["caps_9.2.0_aarch64+hvf.replies"]
    assert hvf["verdict"] == "real" and hvf["variant"] == "hvf" and hvf["accelerator"] == "hvf"
    assert "micro version 9.2.2 (filed under 9.2.0)" in hvf["warnings"]
    assert by_name["caps_9.2.0_x86_64+amdsev.replies"]["verdict"] == "real"
    assert by_name["caps_9.2.0_x86_64+amdsev.replies"]["variant"] == "amdsev"
    assert any("not a vanilla release" in w for w in by_name["caps_9.0.0_sparc.replies"]["warnings"])
    assert by_name["caps_8.2.0_x86_64.replies"]["host_cpu_expanded"] is True
    assert by_name["caps_8.2.0_x86_64.replies"]["machine_types"] > 30


def test_a_tcg_only_copy_of_a_real_arch_is_a_loud_fake(data11, tmp_path, capsys):
    """The farm's reason to exist: a TCG-only x86_64 dump must be flagged.

    Made from a real dump by keeping only its TCG session and saying KVM is off,
    which is what qemucapsprobe records on a host without /dev/kvm.
    """
    source = dump.load(data11 / "caps_9.2.0_x86_64.replies")
    first = source.sessions[0]
    for ex in first:
        if ex.execute == "query-kvm":
            ex.reply["return"] = {"enabled": False, "present": False}
    fake = tmp_path / "caps_9.2.0_x86_64.replies"
    fake.write_text(dump.render(first))
    code, out = run_farm(capsys, "replies", "inspect", "--json", str(fake))
    assert code == 1
    (r,) = json.loads(out)
    assert r["verdict"] == "fake" and r["expects_real"] is True
    assert r["reasons"][0].startswith("FAKE: TCG only")


def test_fmt_of_old_layout_gives_files_qemu_replies_tool_accepts(libvirt11, data9, tmp_path, capsys):
    files = []
    for f in sorted(data9.glob("*.replies")):
        copy = tmp_path / f.name
        shutil.copy(f, copy)
        files.append(copy)
    assert replies_tool(libvirt11, files[0]).returncode == 1  # the old layout is not the current one
    code, out = run_farm(capsys, "replies", "fmt", "--check", *map(str, files))
    assert code == 1 and out.count("would reformat") == 29
    code, out = run_farm(capsys, "replies", "fmt", *map(str, files))
    assert code == 0 and out.count("reformatted") == 29
    result = replies_tool(libvirt11, *files)
    assert result.returncode == 0, result.stdout[-2000:]
    assert result.stdout.count("... OK") == 29
    # same conversation, only the layout changed
    for f in files:
        old, new = dump.load(data9 / f.name), dump.load(f)
        assert [e.command for e in old.exchanges] == [e.command for e in new.exchanges]
        assert [e.reply for e in old.exchanges] == [e.reply for e in new.exchanges]
    code, out = run_farm(capsys, "replies", "fmt", "--check", *map(str, files))
    assert code == 0 and out.count("unchanged") == 29


def test_names_both_schemes_and_escapes():
    n = DumpName.parse("caps_9.2.0_x86_64+amdsev.replies")
    assert (str(n.version), n.arch.value, n.variant, n.scheme) == ("9.2.0", "x86_64", "amdsev", Scheme.current)
    assert str(n) == "caps_9.2.0_x86_64+amdsev.replies"
    o = DumpName.parse("caps_8.0.0.x86_64.replies")
    assert o.scheme is Scheme.old and str(o.with_scheme(Scheme.current)) == "caps_8.0.0_x86_64.replies"
    assert str(DumpName.parse("caps_9.2.0_x86_64.xml")) == "caps_9.2.0_x86_64.xml"
    from farm.errors import UsageError

    for bad in ("../caps_9.2.0_x86_64.replies", "caps_9.2.0_x86_64.replies/..", "caps_9.2.0_ppc64el.replies", "x.replies"):
        with pytest.raises(UsageError):
            DumpName.parse(bad)


def test_coverage_matrix_of_a_libvirt_tree(libvirt11, libvirt9, capsys):
    code, out = run_farm(capsys, "coverage", "--json", str(libvirt11))
    assert code == 0
    cov = json.loads(out)
    assert cov["scheme"] == "current"
    assert len(cov["cells"]) == 29
    cells = {(c["version"], c["column"]): c["verdict"] for c in cov["cells"]}
    assert cells[("9.2.0", "x86_64")] == "real"
    assert cells[("9.2.0", "aarch64+hvf")] == "real"
    assert cells[("9.1.0", "riscv64")] == "fake"
    assert "x86_64+amdsev" in cov["columns"] and "10.0.0" in cov["versions"]
    code, out = run_farm(capsys, "coverage", "--json", str(libvirt9))
    assert json.loads(out)["scheme"] == "old"
    code, out = run_farm(capsys, "coverage", str(libvirt11))
    assert code == 0 and "x86_64+amdsev" in out and "real" in out


def test_usage_errors_exit_2_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.replies"
    assert farm(["replies", "validate", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert farm(["coverage", str(tmp_path)]) == 2
    assert "not a libvirt checkout" in capsys.readouterr().err
    binary = tmp_path / "caps_9.2.0_x86_64.replies"
    binary.write_bytes(b"\xff\xfe\x00")
    assert farm(["replies", "inspect", str(binary)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
