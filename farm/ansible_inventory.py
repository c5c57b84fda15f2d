"""The inventory as Ansible's dynamic inventory (JSON): one source of truth for hosts.

``farm ansible-inventory --list`` prints every group and, under ``_meta.hostvars``, every host's
variables; ``--host NAME`` prints one host's variables. Groups: ``agents`` (every inventory host),
``arch_<arch>`` (e.g. ``arch_x86_64``), ``tag_<tag>`` for each tag, and ``coordinator`` (this machine,
``localhost`` over a local connection). Host variables: ``ansible_host``, ``ansible_port`` and
``ansible_user`` (ssh hosts) or ``ansible_connection: local`` (local hosts), and ``farm_*``: what the
roles need to provision the host as the inventory describes it.

Every string of a host's variables is marked unsafe, ``{"__ansible_unsafe": "..."}``: Ansible
never templates it, so an inventory value such as ``{{ lookup('pipe', ...) }}`` stays text and
runs nothing on the controller. Only the coordinator's own ``ansible_python_interpreter`` (farm's
constant, not the inventory's) is a template.
"""

from __future__ import annotations

import re
from typing import Any

from farm.inventory import Host, Inventory

COORDINATOR = "localhost"


def group_name(prefix: str, value: str) -> str:
    """A valid Ansible group name: letters, digits and underscores."""
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", value)


def unsafe(value: Any) -> Any:
    """``value`` with every string marked unsafe for Ansible (never templated)."""
    if isinstance(value, str):
        return {"__ansible_unsafe": value}
    if isinstance(value, list):
        return [unsafe(v) for v in value]
    if isinstance(value, dict):
        return {k: unsafe(v) for k, v in value.items()}
    return value


def host_vars(host: Host) -> dict[str, Any]:
    """The Ansible variables of one inventory host, strings marked unsafe."""
    return unsafe(_host_vars(host))


def _host_vars(host: Host) -> dict[str, Any]:
    if host.transport == "local":
        connection: dict[str, Any] = {"ansible_connection": "local"}
    else:
        connection = {"ansible_host": host.address, "ansible_port": host.port, "ansible_user": host.user}
    toolchain = host.toolchain
    return {
        **connection,
        "farm_arch": host.arch.value,
        "farm_qemu_target": host.arch.qemu_target,
        "farm_transport": host.transport,
        "farm_address": host.address,
        "farm_port": host.port,
        "farm_user": host.user,
        "farm_host_key": host.host_key,
        "farm_variants": list(host.variants),
        "farm_max_jobs": host.max_jobs,
        "farm_tags": list(host.tags),
        "farm_agent_python": host.agent_python,
        "farm_toolchain_libvirt": toolchain.libvirt,
        "farm_toolchain_qemu": toolchain.qemu,
        "farm_cache_dir": toolchain.cache_dir,
    }


def coordinator_vars() -> dict[str, Any]:
    # the Python running Ansible, as for Ansible's implicit localhost
    return {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}


def groups(inventory: Inventory) -> dict[str, list[str]]:
    """Group name -> host names, in inventory order."""
    out: dict[str, list[str]] = {"agents": [h.name for h in inventory.hosts]}
    for host in inventory.hosts:
        out.setdefault(group_name("arch_", host.arch.value), []).append(host.name)
    for host in inventory.hosts:
        for tag in host.tags:
            out.setdefault(group_name("tag_", tag), []).append(host.name)
    out["coordinator"] = [COORDINATOR]
    return out


def ansible_list(inventory: Inventory) -> dict[str, Any]:
    """The answer to ``--list``: groups, ``all.children`` and ``_meta.hostvars``."""
    grouped = groups(inventory)
    result: dict[str, Any] = {"all": {"children": ["ungrouped", *grouped]}}
    for name, members in grouped.items():
        result[name] = {"hosts": members}
    hostvars = {h.name: host_vars(h) for h in inventory.hosts}
    hostvars.setdefault(COORDINATOR, coordinator_vars())
    result["_meta"] = {"hostvars": hostvars}
    return result


def ansible_host(inventory: Inventory, name: str) -> dict[str, Any]:
    """The answer to ``--host NAME``."""
    if name == COORDINATOR and all(h.name != name for h in inventory.hosts):
        return coordinator_vars()
    return host_vars(inventory.host(name))
