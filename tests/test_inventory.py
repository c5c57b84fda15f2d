"""The inventory file and the settings: what loads, and how mistakes are reported."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from farm.caps.arch import Architecture
from farm.config import Settings, settings
from farm.errors import UsageError
from farm.inventory import Source, default_inventory, load_inventory, parse_host_key, resolve_inventory

EXAMPLE = Path(__file__).resolve().parent.parent / "inventory.yaml"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM1pKiCkLYhB1GdD0Y1IKDN8JrPqDXUQCfUUNnjtOPHd"
A = Architecture


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def host(**fields: object) -> str:
    fields = {"name": "ppc-1", "arch": "ppc64", "address": "ppc-1.example.org", "host_key": KEY, **fields}
    lines = [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return "hosts:\n  - " + "\n    ".join(lines) + "\n"


def test_example_inventory():
    inv = load_inventory(EXAMPLE)
    assert inv.archs() == [A.x86_64, A.aarch64, A.ppc64, A.s390x]
    assert [h.name for h in inv.hosts_for(A.x86_64)] == ["x86-1", "x86-sev"]
    assert [h.name for h in inv.hosts_for(A.x86_64, "amdsev")] == ["x86-sev"]
    assert inv.hosts_for(A.riscv64) == []
    assert all(h.transport == "ssh" and h.host_key.startswith("ssh-ed25519 AAAA") for h in inv.hosts)
    ppc, s390 = inv.host("ppc-1"), inv.host("s390-1")
    # defaults apply, the toolchain merges key by key
    assert ppc.toolchain.qemu_source == Source("binary", "/opt/qemu/bin/qemu-system-ppc64")
    assert ppc.toolchain.libvirt_source == Source("git", "https://gitlab.com/libvirt/libvirt.git", "master")
    assert ppc.toolchain.cache_dir == "/var/cache/farm"
    assert (s390.port, s390.user, s390.toolchain.libvirt_source) == (2222, "probe", Source("debian", "11.3.0-3+deb13u3"))
    assert s390.identity_file.is_absolute()
    assert inv.host("x86-sev").host_key.count(" ") == 1  # the comment is dropped
    dumped = inv.host("x86-sev").model_dump(mode="json")
    assert dumped["arch"] == "x86_64" and dumped["variants"] == ["amdsev"]
    with pytest.raises(UsageError, match="no host 'nope'.*x86-1"):
        inv.host("nope")


def test_default_inventory(monkeypatch):
    inv = default_inventory()
    assert [h.name for h in inv.hosts] == ["local-x86_64", "local-aarch64", "local-ppc64", "local-s390x"]
    assert inv.archs() == [A.x86_64, A.aarch64, A.ppc64, A.s390x]
    for h in inv.hosts:
        assert h.transport == "local" and h.address is None
        assert h.toolchain.qemu_source == Source("system")
        assert h.toolchain.libvirt == "debian:11.3.0-3+deb13u3"
    monkeypatch.delenv("FARM_INVENTORY", raising=False)
    assert resolve_inventory(None) == inv
    assert inv.source == "farm/inventories/local.yaml (built-in)"
    monkeypatch.setenv("FARM_INVENTORY", str(EXAMPLE))
    assert resolve_inventory(None).source == str(EXAMPLE)
    assert resolve_inventory(Path(__file__).parent.parent / "farm/inventories/local.yaml").hosts == inv.hosts


def test_minimal_host_defaults(tmp_path):
    inv = load_inventory(write(tmp_path, host()))
    h = inv.hosts[0]
    assert (h.transport, h.port, h.user, h.max_jobs, h.variants, h.agent_python) == ("ssh", 22, "farm", 1, [], "python3")
    assert h.toolchain.libvirt == "git:https://gitlab.com/libvirt/libvirt.git@master"
    assert h.toolchain.qemu == "system"


def test_known_hosts_replaces_host_key(tmp_path):
    text = "defaults:\n  known_hosts: keys/known_hosts\n" + host(host_key=None)
    h = load_inventory(write(tmp_path, text)).hosts[0]
    assert h.host_key is None and h.known_hosts == tmp_path / "keys/known_hosts"


BAD = [
    # (inventory text, expected parts of the message)
    (host(max_job=2), [":6:", "host 'ppc-1'", "field 'max_job'", "unknown field, did you mean 'max_jobs'?"]),
    (host(arch="ppc64el"), [":3:", "host 'ppc-1'", "field 'arch'", "unknown arch 'ppc64el' (known: x86_64"]),
    (host(address=None), ["host 'ppc-1'", "field 'address'", "required for transport 'ssh'"]),
    (host(address="bad_host!"), ["host 'ppc-1'", "field 'address'", "hostname or an IP"]),
    (host(host_key=None), ["host 'ppc-1'", "field 'host_key'", "required for transport 'ssh'", "ssh-keyscan"]),
    (host(host_key="ssh-ed25519 AAAA!!notbase64"), ["host 'ppc-1'", "field 'host_key'", "not valid base64"]),
    (host(host_key="ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ=="), ["field 'host_key'", "not an ssh-ed25519"]),
    (host(host_key="ssh-dss AAAA"), ["field 'host_key'", "expected 'TYPE BASE64'"]),
    (host(max_jobs=0), [":6:", "host 'ppc-1'", "field 'max_jobs'", "greater than or equal to 1"]),
    (host(port=70000), ["host 'ppc-1'", "field 'port'"]),
    (host(name="-x"), ["host '-x'", "field 'name'", "bad host name"]),
    (host(name=None), ["host #1", "field 'name'", "required"]),
    (host(variants="[amdsev, SEV]"), ["host 'ppc-1'", "field 'variants[1]'", "bad variant 'SEV'"]),
    (host(toolchain="{qemu: 'git:https://x/qemu.git'}"), ["field 'toolchain.qemu'", "git:URL@REF"]),
    (host(toolchain="{qemu: 'binary:qemu'}"), ["field 'toolchain.qemu'", "absolute"]),
    (host(toolchain="{libvirt: 'system'}"), ["field 'toolchain.libvirt'", "debian:..."]),
    (host(toolchain="{qmeu: system}"), ["field 'toolchain.qmeu'", "did you mean 'qemu'"]),
    (host(transport="telnet"), ["field 'transport'", "'ssh' or 'local'"]),
    (host() + "  - name: ppc-1\n    transport: local\n    arch: ppc64\n",
     [":6:", "host 'ppc-1'", "field 'name'", "hosts #1 and #2 are both named 'ppc-1'"]),
    (host(arch="x86_64\n    arch: ppc64"), [":4:", "key 'arch' given twice"]),
    ("hosts:\n  - name: a\n    arch: [x86_64\n", [":4:", "YAML syntax error"]),
    ("hosts:\n  - name: a\n   arch: x86_64\n", [":3:", "YAML syntax error"]),
    ("- name: a\n", ["expected a mapping", "not a list"]),
    ("", ["empty inventory"]),
    ("hosts: []\n", ["field 'hosts'", "no hosts"]),
    ("hosts:\n  - just-a-name\n", ["host #1", "expected a mapping, not a string"]),
    ("defaults:\n  port: 0\n" + host(), [":2:", "defaults: field 'port'"]),
    ("defaults:\n  usr: farm\n" + host(), ["defaults: field 'usr'", "did you mean 'user'"]),
    ("hostz: []\n", ["field 'hostz'", "unknown field, did you mean 'hosts'?"]),
    ("hosts:\n  - nmae: a\n    arch: x86_64\n", [":2:", "host #1", "field 'nmae'", "did you mean 'name'"]),
]


@pytest.mark.parametrize(("text", "parts"), BAD, ids=range(len(BAD)))
def test_bad_inventory(tmp_path, text, parts):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as e:
        load_inventory(path)
    message = str(e.value)
    assert message.startswith(str(path)) and "\n" not in message
    for part in parts:
        assert part in message


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="inv.yaml: no such inventory file"):
        load_inventory(tmp_path / "inv.yaml")
    with pytest.raises(UsageError, match="is a directory, not a regular inventory file"):
        load_inventory(tmp_path)


def test_host_key_shapes():
    assert parse_host_key(KEY + " root@x") == KEY
    with pytest.raises(ValueError):
        parse_host_key("ssh-ed25519 " + "A" * 68)  # base64, but not an ed25519 key blob


def test_settings(monkeypatch, tmp_path):
    for name in ("FARM_STATE_DIR", "FARM_GITLAB_TOKEN", "FARM_GITLAB_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FARM_BROKER_URL", "redis://:hunter2@coordinator:6379/0")
    monkeypatch.setenv("FARM_GITLAB_TOKEN", "glpat-sekrit")
    monkeypatch.setenv("FARM_LIBVIRT_CHECKOUT", "~/src/libvirt")
    s = Settings()
    assert s.state_dir.name == "farm" and s.state_dir.is_absolute()
    assert s.libvirt_checkout == Path.home() / "src/libvirt"
    assert s.broker == "redis://:hunter2@coordinator:6379/0"
    assert s.token() == "glpat-sekrit"
    for shown in (repr(s), str(s), str(s.public()), s.model_dump_json()):
        assert "hunter2" not in shown and "sekrit" not in shown
    assert s.public()["broker_url"] == "redis://:***@coordinator:6379/0"

    monkeypatch.delenv("FARM_GITLAB_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text("glpat-fromfile\n")
    monkeypatch.setenv("FARM_GITLAB_TOKEN_FILE", str(token_file))
    assert Settings().token() == "glpat-fromfile"
    monkeypatch.delenv("FARM_GITLAB_TOKEN_FILE")
    with pytest.raises(UsageError, match="no GitLab token"):
        Settings().token()

    settings.cache_clear()
    assert settings() is settings()
    settings.cache_clear()


def test_every_setting_documented():
    assert all(field.description for field in Settings.model_fields.values())
