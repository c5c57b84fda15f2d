"""The agent (stdlib only, copied to hosts) keeps its own table of arch names; farm/caps/arch.py
has the coordinator's. Both must send every name to the same QEMU target."""

from __future__ import annotations

import importlib.util

import pytest

from farm.caps import arch
from farm.caps.arch import Architecture
from tests.helpers import REPO


def agent_module():
    spec = importlib.util.spec_from_file_location("farm_agent_aliases", REPO / "agents" / "farm_agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AGENT = agent_module()
NAMES = sorted(set(AGENT.QEMU_TARGET_ALIASES) | set(arch._UNAME) | {a.value for a in Architecture})


@pytest.mark.parametrize("name", NAMES)
def test_the_agent_and_the_coordinator_send_an_arch_name_to_the_same_qemu_target(name):
    known = Architecture.from_uname(name)
    assert known is not None, f"the agent knows {name!r}, farm/caps/arch.py does not"
    assert AGENT.qemu_target(name) == known.qemu_target, name


def test_every_alias_of_the_agent_is_a_name_the_coordinator_knows():
    assert set(AGENT.QEMU_TARGET_ALIASES) <= set(arch._UNAME) | {a.value for a in Architecture}
