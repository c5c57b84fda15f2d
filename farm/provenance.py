"""Where a dump comes from, as a typed model: what `provenance.json` beside each artifact holds,
and what a worker may say of a job's provenance (parsed at the wire, farm.dispatch.wire). Facts of
the host are the agent's own words (bounded, kept as they are); the verdict and the farm part are
the coordinator's, written by farm.jobs.judge."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Text = Annotated[str, StringConstraints(max_length=4096)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostPart(_Part):
    name: Text
    arch: Text
    facts: dict | None = None  # the agent's facts (farm.hosts.replies.Facts, extra keys kept)


class LibvirtPart(_Part):
    source: Text | None = None
    libvirt_version: Text | None = None
    commit: Text | None = None
    probe: Text | None = None
    cached: bool | None = None


class QemuPart(_Part):
    path: Text | None = None
    version: Text | None = None
    version_line: Text | None = None
    commit: Text | None = None  # built from git: the commit
    origin: Text | None = None  # system, or the source it was built from


class ProbePart(_Part):
    sha256: Text | None = None
    size: int | None = None
    seconds: float | None = None
    exit_status: int | None = None
    timed_out: bool | None = None


class Timings(_Part):
    started: float | None = None
    finished: float | None = None


class VerdictPart(_Part):
    verdict: Text | None = None
    reasons: list[Text] = Field(default_factory=list, max_length=256)
    warnings: list[Text] = Field(default_factory=list, max_length=256)
    facts: dict | None = None  # the inspection's facts


class FarmPart(_Part):
    version: Text
    coordinator: Text
    pid: int


class Provenance(_Part):
    """One job's provenance; every part but the job and host is there once the job got that far."""

    job: Text
    host: HostPart
    libvirt: LibvirtPart | None = None
    qemu: QemuPart | None = None
    probe: ProbePart | None = None
    timings: Timings | None = None
    verdict: VerdictPart | None = None
    farm: FarmPart | None = None

    def to_json(self) -> dict:
        """As stored (provenance.json, the ledger): the parts the job got to, nothing invented."""
        return self.model_dump(mode="json", exclude_unset=True)
