"""Ansible provisioning (ansible/): lint and syntax in CI, the dynamic inventory read by Ansible
itself, and a real run of the agent role over SSH against a test host in its own network
namespace (tests/netns.py), twice: the second run changes nothing.

What cannot run here is checked with --check: this container has no systemd (PID 1 is not
systemd), so the units (farm worker on an agent, the coordinator's workers, beat and dashboard)
are rendered in check mode and the tasks that enable and start them are skipped on hosts whose
service manager is not systemd. The test hosts share this machine's file system (only the
network is their own), so the run installs nothing new (the packages are bootstrap's) and its
user and directories are the test's own, removed afterwards."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, farm, needs_root
from tests.standin import standin_builddir

ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e .[test])")
    return found


def ansible_env(inventory: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "ANSIBLE_"))}
    env.update(
        FARM_INVENTORY=str(inventory),
        FARM=str(BIN / "farm"),
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
        ANSIBLE_LOCAL_TEMP=tempfile.gettempdir(),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    return env


def playbook(env: dict, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ansible-playbook site.yml; the PLAY RECAP per host: {host: {ok, changed, ...}}."""
    done = subprocess.run([tool("ansible-playbook"), "site.yml", *args], cwd=ANSIBLE, env=env,
                          capture_output=True, text=True, timeout=timeout)
    recap = {}
    tail = done.stdout.split("PLAY RECAP", 1)[-1]
    for m in re.finditer(r"^(\S+)\s+:\s+(.*)$", tail, re.M):
        recap[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return done, recap


def ssh_entry(name: str, address: str, key: str, **extra) -> dict:
    return {"name": name, "transport": "ssh", "address": address, "host_key": key, **extra}


def keypair(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


# --- static checks ---------------------------------------------------------------------------


def test_ansible_lint_production_profile():
    done = subprocess.run([tool("ansible-lint"), "--offline", "--profile", "production", "--nocolor"],
                          cwd=ANSIBLE, env=ansible_env(REPO / "inventory.yaml"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_site_syntax_check():
    done, _ = playbook(ansible_env(REPO / "inventory.yaml"), "--syntax-check")
    assert done.returncode == 0, done.stdout + done.stderr


# --- the dynamic inventory -------------------------------------------------------------------


def plain(value):
    """Host variables with the unsafe marks (``{"__ansible_unsafe": s}``) taken off."""
    if isinstance(value, dict):
        return value["__ansible_unsafe"] if set(value) == {"__ansible_unsafe"} else {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, list) else value


def test_ansible_inventory_list_and_host(env, tmp_path):
    keys = [keypair(tmp_path / f"hk{i}") for i in range(3)]
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({
        "defaults": {"user": "prober", "toolchain": {"libvirt": "debian:11.3.0-3+deb13u3"}},
        "hosts": [
            ssh_entry("big-x86", "10.1.0.5", keys[0], arch="x86_64", tags=["lab"], variants=["amdsev"]),
            ssh_entry("z-1", "z1.example.org", keys[1], arch="s390x", port=2222, max_jobs=2,
                      toolchain={"cache_dir": "/srv/farm-cache"}, agent_python="/usr/bin/python3.11"),
            ssh_entry("p9", "10.1.0.7", keys[2], arch="ppc64", tags=["lab", "self-served"]),
            {"name": "here", "transport": "local", "arch": "aarch64"},
        ],
    }))
    code, out, err = farm(env, "ansible-inventory", "--list", "--inventory", str(inventory))
    assert code == 0, err
    assert out["agents"]["hosts"] == ["big-x86", "z-1", "p9", "here"]
    assert out["arch_x86_64"]["hosts"] == ["big-x86"]
    assert out["arch_s390x"]["hosts"] == ["z-1"]
    assert out["arch_ppc64"]["hosts"] == ["p9"]
    assert out["arch_aarch64"]["hosts"] == ["here"]
    assert out["tag_lab"]["hosts"] == ["big-x86", "p9"]
    assert out["coordinator"]["hosts"] == ["localhost"]
    assert set(out["all"]["children"]) >= {"agents", "coordinator", "arch_x86_64", "arch_s390x"}
    assert out["_meta"]["hostvars"]["z-1"]["ansible_host"] == {"__ansible_unsafe": "z1.example.org"}
    hv = plain(out["_meta"]["hostvars"])
    assert hv["localhost"]["ansible_connection"] == "local"
    z = hv["z-1"]
    assert (z["ansible_host"], z["ansible_port"], z["ansible_user"]) == ("z1.example.org", 2222, "prober")
    assert z["farm_arch"] == "s390x" and z["farm_qemu_target"] == "s390x"
    assert z["farm_host_key"] == keys[1] and z["farm_max_jobs"] == 2
    assert z["farm_cache_dir"] == "/srv/farm-cache" and z["farm_agent_python"] == "/usr/bin/python3.11"
    assert z["farm_toolchain_libvirt"] == "debian:11.3.0-3+deb13u3" and z["farm_toolchain_qemu"] == "system"
    assert hv["p9"]["farm_qemu_target"] == "ppc64" and hv["big-x86"]["farm_variants"] == ["amdsev"]
    assert hv["here"]["ansible_connection"] == "local" and "ansible_host" not in hv["here"]

    code, one, err = farm(env, "ansible-inventory", "--host", "z-1", "--inventory", str(inventory))
    assert code == 0 and plain(one) == z, err
    code, _, err = farm(env, "ansible-inventory", "--host", "nope", "--inventory", str(inventory))
    assert code == 2 and "no host 'nope'" in err

    # Ansible itself reads it through the script in ansible/inventory, with group_vars of ansible/
    done = subprocess.run([tool("ansible-inventory"), "--list", "--playbook-dir", str(ANSIBLE)], cwd=ANSIBLE,
                          env=ansible_env(inventory), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["arch_s390x"]["hosts"] == ["z-1"]
    assert seen["_meta"]["hostvars"]["z-1"]["ansible_port"] == 2222
    assert "StrictHostKeyChecking=yes" in seen["_meta"]["hostvars"]["z-1"]["ansible_ssh_common_args"]

    # the coordinator's known_hosts and worker list, rendered in check mode (no systemd here)
    out_dir = tmp_path / "etc"
    done, recap = playbook(
        ansible_env(inventory), "--limit", "coordinator", "--check", "--diff",
        "-e", "ansible_become_method=su",
        "-e", f"farm_known_hosts_file={out_dir}/known_hosts",
        "-e", f"farm_coordinator_config_dir={out_dir}", "-e", f"farm_coordinator_systemd_dir={out_dir}/systemd",
        "-e", f"farm_coordinator_state_dir={out_dir}/state", "-e", "farm_coordinator_dashboard=true",
        "-e", f"farm_coordinator_redis_password_file={out_dir}/redis.password",
        "-e", f"farm_coordinator_result_key_file={out_dir}/result.key",
    )
    assert done.returncode == 0 and recap["localhost"]["failed"] == 0, done.stdout + done.stderr
    diff = done.stdout
    assert f"10.1.0.5 {keys[0]}" in diff and f"[z1.example.org]:2222 {keys[1]}" in diff
    assert "ExecStart=" in diff and "worker --hosts %i" in diff and "dashboard --host 127.0.0.1 --port 8080" in diff
    # the enable/start tasks are skipped: this container's service manager is not systemd
    assert "A worker per SSH-served host (systemd hosts only)" in diff
    # Redis asks for a password, kept in a file, and the farm's result key is made: neither is shown
    for task in ("Keep the Redis password (root and the farm user only)", "Redis asks for the password",
                 "The farm's result key (made once, then kept; copy it to every worker's machine)"):
        assert task in diff
    assert "requirepass " not in diff and "FARM_BROKER_URL=redis://:" not in diff
    assert not out_dir.exists(), "check mode wrote files"


def test_inventory_strings_are_never_templated_by_ansible(tmp_path):
    """Inventory values reach Ansible marked unsafe: real Ansible reads and prints a lookup
    template as text and runs nothing. The control, the same variables without the marks (what
    `farm ansible-inventory` used to print), does run the command: the check can fail."""
    marker = tmp_path / "pwned"
    template = "{{ lookup('pipe', 'touch %s') }}" % marker
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"hosts": [{
        "name": "here", "transport": "local", "arch": "x86_64", "tags": [template],
        "toolchain": {"libvirt": f"builddir:/srv/{template}", "cache_dir": template},
    }]}))
    env = ansible_env(inventory)
    show = "msg={{ farm_tags[0] }}|{{ farm_toolchain_libvirt }}|{{ farm_cache_dir }}"

    def debug(inventory_source: str) -> subprocess.CompletedProcess:
        return subprocess.run([tool("ansible"), "here", "-i", inventory_source, "-m", "ansible.builtin.debug",
                               "-a", show, "--playbook-dir", str(ANSIBLE)], cwd=ANSIBLE, env=env,
                              capture_output=True, text=True, timeout=120)

    done = debug("inventory/farm")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = json.loads(done.stdout.split("=>", 1)[1])["msg"]
    assert shown == f"{template}|builddir:/srv/{template}|{template}"
    assert not marker.exists()

    # the control: the same output with the unsafe marks taken off
    code, listed, err = farm(env, "ansible-inventory", "--list")
    assert code == 0, err
    unmarked = tmp_path / "unmarked.json"
    unmarked.write_text(json.dumps(plain(listed)))
    script = tmp_path / "unmarked.sh"
    script.write_text(f"#!/bin/sh\ncase $1 in --list) cat {unmarked};; *) echo {{}};; esac\n")
    script.chmod(0o755)
    assert debug(str(script)).returncode == 0
    assert marker.exists()


# --- a real run against an SSH host ----------------------------------------------------------


@pytest.fixture
def provision_user():
    """A user name of this test run's own; the user is removed afterwards (the role creates it)."""
    name = f"fprov{os.getpid() % 100000}"
    yield name
    subprocess.run(["userdel", "-r", name], capture_output=True)


@needs_root
def test_agent_role_real_run_twice_second_changes_nothing(ssh_hosts, provision_user, tmp_path):
    (h,) = ssh_hosts.create(1, prefix="prov", root=True)
    base = Path(tempfile.mkdtemp(prefix="farm-ansible-"))
    try:
        os.chmod(base, 0o755)  # the new user reads the stand-in build dir and the agent from here
        builddir = standin_builddir(base / "build", 0)
        inventory = ssh_hosts.inventory(tmp_path / "inventory.yaml", [h.entry(
            user=provision_user, toolchain={"libvirt": f"builddir:{builddir}", "cache_dir": str(base / "cache")},
        )])
        coordinator_key = keypair(tmp_path / "coordinator")
        known_hosts = tmp_path / "known_hosts"
        env = ansible_env(inventory)
        common = ["-e", "ansible_become_method=su", "-e", f"farm_known_hosts_file={known_hosts}"]

        # the coordinator role writes the known_hosts file of the pinned keys (for real, locally)
        done, recap = playbook(env, "--limit", "coordinator", "--tags", "farm_known_hosts", *common)
        assert done.returncode == 0, done.stdout + done.stderr
        assert known_hosts.read_text().splitlines()[-1] == f"{h.address} {h.host_key}"

        # (root's login shell here puts pyenv shims first on PATH: name the system Python)
        agent = [*common, "--limit", h.name, "-e", "ansible_user=root", "-e", "ansible_python_interpreter=/usr/bin/python3",
                 "-e", f"ansible_ssh_private_key_file={ssh_hosts.client_key}",
                 "-e", "farm_agent_update_cache=false",
                 "-e", json.dumps({"farm_coordinator_public_key": coordinator_key})]

        # a known_hosts without the key: Ansible refuses the host (no auto-add)
        other = tmp_path / "other_known_hosts"
        other.write_text(f"{h.address} {keypair(tmp_path / 'wrong')}\n")
        done, recap = playbook(env, *agent, "-e", f"farm_known_hosts_file={other}")
        assert recap[h.name]["unreachable"] == 1, done.stdout + done.stderr
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in done.stdout + done.stderr or \
            "Host key verification failed" in done.stdout + done.stderr

        done, first = playbook(env, *agent)
        assert done.returncode == 0, done.stdout + done.stderr
        assert first[h.name]["failed"] == 0 and first[h.name]["unreachable"] == 0
        assert first[h.name]["changed"] >= 5  # user, .ssh, authorized_keys, cache dir, agent

        account = pwd.getpwnam(provision_user)
        groups = subprocess.run(["id", "-nG", provision_user], capture_output=True, text=True).stdout.split()
        assert "kvm" in groups
        keys = Path(account.pw_dir, ".ssh", "authorized_keys").read_text()
        assert coordinator_key in keys
        # where farm's own agent client looks for it (and checks it by sha256): <cache_dir>/farm_agent.py
        assert (base / "cache" / "farm_agent.py").read_bytes() == (REPO / "agents" / "farm_agent.py").read_bytes()
        assert (base / "cache").stat().st_uid == account.pw_uid
        assert "Prepare qemucapsprobe with the agent's own toolchain command" in done.stdout

        done, second = playbook(env, *agent)
        assert done.returncode == 0, done.stdout + done.stderr
        assert second[h.name]["changed"] == 0 and second[h.name]["failed"] == 0, done.stdout

        # the farm worker unit of a self-serving host: rendered in check mode only, and its
        # start skipped (no systemd in this container)
        done, check = playbook(env, *agent, "--check", "--diff", "-e", "farm_agent_worker=true",
                               "-e", f"farm_agent_systemd_dir={base}/systemd")
        assert done.returncode == 0, done.stdout + done.stderr
        assert check[h.name]["changed"] == 1 and check[h.name]["failed"] == 0, done.stdout
        assert f"worker --hosts {h.name}" in done.stdout and f"User={provision_user}" in done.stdout
        assert not (base / "systemd").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
