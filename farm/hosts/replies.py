"""What an agent replies to `farm_agent.py job`, as typed models: parsed where the reply crosses
from the host, bounded, and the only way the coordinator reads it (farm.jobs.run_job). A reply
that does not parse is the host's failure (HostError), never a KeyError deep in a job."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Text = Annotated[str, StringConstraints(max_length=4096)]


class _Open(BaseModel):
    """A part of a reply whose other keys are kept as they are (provenance), not read."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Kvm(_Open):
    usable: bool = False
    error: Text | None = None


class Facts(_Open):
    """The host as its agent sees it (the keys farm reads; the rest goes to provenance)."""

    arch: Annotated[str, StringConstraints(max_length=64)] = "?"
    kvm: Kvm = Field(default_factory=Kvm)
    user: int | None = None  # the agent's uid


class LibvirtBuild(_Open):
    source: Text | None = None
    libvirt_version: Text | None = None
    commit: Text | None = None
    probe: Text | None = None
    cached: bool | None = None


class QemuBuild(_Open):
    path: Text | None = None
    binary: Text | None = None
    version: Text | None = None
    version_line: Text | None = None
    commit: Text | None = None


class ProbeResult(_Open):
    ok: bool = False
    sha256: Text | None = None
    size: int | None = None
    seconds: float | None = None
    exit_status: int | None = None
    timed_out: bool = False
    stderr_tail: list[Text] | Text = Field(default_factory=list)
    error: Text | None = None

    @property
    def tail(self) -> list[str]:
        return self.stderr_tail.splitlines() if isinstance(self.stderr_tail, str) else list(self.stderr_tail)


class JobReply(BaseModel):
    """facts + toolchains + probe (+ the dump, decompressed) of one `job` call: how far it got."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool = False
    facts: Facts | None = None
    libvirt: LibvirtBuild | None = None
    qemu: QemuBuild | None = None
    probe: ProbeResult | None = None
    dump: str | None = None
    error: Text | None = None
