"""farm.caps.diff on libvirt's own dumps: facts checked by hand in the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.caps import dump
from farm.caps.diff import Change, DumpDiff, diff


def load(data: Path, name: str) -> dump.Dump:
    return dump.load(data / f"{name}.replies")


def section(changes, title):
    """The Change titled ``title``, or an empty one."""
    return next((c for c in changes if c.title == title), Change(title, [], [], []))


@pytest.fixture(scope="module")
def d91_92(data11: Path) -> DumpDiff:
    return diff(load(data11, "caps_9.1.0_x86_64"), load(data11, "caps_9.2.0_x86_64"))


def test_version_and_header(d91_92: DumpDiff):
    assert d91_92.version == ("9.1.0", "9.2.0")
    assert not d91_92.empty
    assert d91_92.to_text().splitlines()[0] == (
        "caps_9.1.0_x86_64.replies -> caps_9.2.0_x86_64.replies (QEMU 9.1.0 -> 9.2.0)"
    )


def test_qemu_9_2_features(d91_92: DumpDiff):
    f = d91_92.features
    assert section(f, "QMP commands").added == ["device-sync-config"]
    assert {"pc-q35-9.2", "pc-i440fx-9.2"} == set(section(f, "Machine types").added)
    # the default machine and the aliases moved to the new versions
    assert "pc-i440fx-9.1: alias pc -> (none), is-default true -> (none)" in section(f, "Machine types").changed
    assert "pc-q35-6.2: deprecated false -> true" in section(f, "Machine types").changed
    assert section(f, "CPU models").added == ["GraniteRapids-v2"]
    qom = section(f, "QOM types")
    assert "acpi-generic-port" in qom.added and "vhost-user-scmi" in qom.removed
    schema = section(f, "QMP schema")
    assert "query-target/ret-type/arch/^cris" in schema.removed  # CRIS target dropped
    assert "chardev-add/arg-type/backend/+socket/data/reconnect-ms" in schema.added
    assert "chardev-add/arg-type/backend/+socket/data/reconnect/$deprecated" in schema.added
    assert "intel-iommu.stale-tm" in section(f, "Device properties").added
    assert "-machine smp-cache" in section(f, "Command-line options").added


def test_environment_reported_apart(d91_92: DumpDiff):
    titles = {c.title for c in d91_92.environment}
    assert "Host CPU model expansion" in titles
    assert not titles & {c.title for c in d91_92.features}
    # 9.1.0's dump lists some unavailable features twice: sets, not lists, are compared
    unavailable = section(d91_92.environment, "CPU models unavailable on the host")
    assert unavailable.added == ["GraniteRapids-v2"] and unavailable.changed == []


def test_property_type_and_default_changes(data11: Path):
    d = diff(load(data11, "caps_9.2.0_x86_64"), load(data11, "caps_10.0.0_x86_64"))
    changed = section(d.features, "Device properties").changed
    assert "PIIX4_PM.rombar: default-value 1 -> -1, type uint32 -> int32" in changed
    assert "ICH9-LPC.addr: type int32 -> str" in changed
    d = diff(load(data11, "caps_8.2.0_x86_64"), load(data11, "caps_9.0.0_x86_64"))
    assert "migrate/arg-type/uri: string -> string (optional)" in section(d.features, "QMP schema").changed
    assert "vhost-user-rng: virtio-device -> vhost-user-base" in section(d.features, "QOM types").changed
    assert section(d.features, "Migration capabilities").added == ["mapped-ram"]


def test_same_dump_is_empty(data11: Path):
    d = diff(load(data11, "caps_9.2.0_x86_64"), load(data11, "caps_9.2.0_x86_64"))
    assert d.empty and d.features == [] and d.environment == []
    assert "no semantic changes" in d.to_text()
    assert "No semantic changes." in d.to_markdown()
    assert d.to_json()["empty"] is True


def test_hvf_differs_only_in_accelerator(data11: Path):
    d = diff(load(data11, "caps_7.2.0_x86_64"), load(data11, "caps_7.2.0_x86_64+hvf"))
    assert d.features == []
    assert [c.title for c in d.environment] == ["Accelerator"]
    assert d.environment[0].changed == ["query-kvm.enabled: true -> false", "query-kvm.present: true -> false"]


def test_amdsev_host(data11: Path):
    d = diff(load(data11, "caps_9.2.0_x86_64"), load(data11, "caps_9.2.0_x86_64+amdsev"))
    sev = section(d.environment, "Confidential computing")
    assert "query-sev-capabilities.cbitpos" in sev.added
    assert "Broadwell: -erms -invpcid -pcid" in section(d.environment, "CPU models unavailable on the host").changed
    # the +amdsev dump came from another QEMU build: not only the host differs
    assert "nitro-enclave" in section(d.features, "Machine types").added


@pytest.mark.parametrize("version", ["6.2.0", "7.0.0", "7.1.0", "7.2.0"])
def test_old_layout_same_qemu_is_empty(data9: Path, data11: Path, version: str):
    # libvirt 9.0.0 also probed query-commands; 11.3.0 also probes
    # qom-list-properties of generic-pc-machine: probes in one dump only are no change
    d = diff(load(data9, f"caps_{version}.x86_64"), load(data11, f"caps_{version}_x86_64"))
    assert d.empty, d.to_text()


def test_old_layout_snapshot_replaced_by_release(data9: Path, data11: Path):
    d = diff(load(data9, "caps_8.0.0.x86_64"), load(data11, "caps_8.0.0_x86_64"))
    assert d.version == ("7.2.50", "8.0.0")
    assert "cxl-inject-correctable-error" in section(d.features, "QMP commands").added
    assert {"SapphireRapids", "SapphireRapids-v1"} <= set(section(d.features, "CPU models").added)


def test_markdown(d91_92: DumpDiff):
    md = d91_92.to_markdown()
    assert md.startswith("### `caps_9.1.0_x86_64.replies` → `caps_9.2.0_x86_64.replies`")
    assert "#### QEMU changes" in md and "#### Environment changes (host, accelerator)" in md
    assert "<b>QMP commands</b>: +1\n\n- `+ device-sync-config`" in md  # short list: plain
    assert "<details>\n<summary><b>QMP schema</b>: +51 -12</summary>" in md  # long list: folded


def test_text_limit(d91_92: DumpDiff):
    text = d91_92.to_text(limit=2)
    assert "QMP schema: +51 -12\n" in text and "  ... and 61 more\n" in text
    assert "Environment (host, accelerator):" in text
    assert len(d91_92.to_text()) > len(text)


def test_json_round_trips(d91_92: DumpDiff):
    data = d91_92.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["version"] == {"old": "9.1.0", "new": "9.2.0"}
    commands = next(c for c in data["features"] if c["title"] == "QMP commands")
    assert commands == {"title": "QMP commands", "added": ["device-sync-config"], "removed": [], "changed": []}


def test_deterministic(data11: Path):
    a, b = load(data11, "caps_9.2.0_x86_64"), load(data11, "caps_10.0.0_x86_64")
    assert diff(a, b).to_text() == diff(a, b).to_text()
    for change in diff(a, b).features:
        assert change.added == sorted(change.added) and change.removed == sorted(change.removed)
