"""What a dump says about its QEMU and its probe, and the verdict: real, fake or invalid.

An accelerated probe answers ``query-kvm`` with ``enabled: true`` (QEMU <= 10.1)
or ``query-accelerators`` with ``enabled: "kvm"`` (QEMU >= 10.2) and holds a
second, TCG-only probe session. A TCG-only dump has one session: a "fake".
``+hvf`` dumps (macOS Hypervisor.framework) say KVM false but have two sessions.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from farm.caps.arch import Architecture
from farm.caps.dump import Dump, Layout
from farm.caps.names import DumpName
from farm.caps.version import QemuVersion

ACCELERATED = ("kvm", "mshv", "hvf")
_VANILLA = re.compile(r"v[0-9]+\.[0-9]+\.[0-9]+(-rc[0-9]+)?")


class Verdict(enum.Enum):
    real = "real"
    fake = "fake"
    invalid = "invalid"


@dataclass
class Facts:
    qemu_version: QemuVersion | None = None
    package: str | None = None
    target: str | None = None  # query-target's arch, as QEMU names it
    arch: Architecture | None = None
    sessions: int = 0
    accelerator: str = "unknown"  # kvm | tcg | hvf | mshv | ... | unknown
    accelerators_present: list[str] = field(default_factory=list)
    host_cpu_expanded: bool = False
    machine_types: int = 0
    cpu_models: int = 0
    device_types: int = 0  # QOM types listed by qom-list-types


@dataclass
class Inspection:
    file: str
    name: DumpName | None
    layout: Layout | None
    facts: Facts
    verdict: Verdict
    reasons: list[str]
    warnings: list[str]

    @property
    def expects_real(self) -> bool:
        """libvirt expects this arch's dumps from real hardware."""
        arch = self.name.arch if self.name else self.facts.arch
        return bool(arch and arch.needs_hardware)

    @property
    def alarming(self) -> bool:
        """Invalid, or fake where libvirt expects real hardware."""
        return self.verdict is Verdict.invalid or (self.verdict is Verdict.fake and self.expects_real)

    def to_json(self) -> dict[str, Any]:
        facts = asdict(self.facts)
        facts["qemu_version"] = str(self.facts.qemu_version) if self.facts.qemu_version else None
        facts["arch"] = self.facts.arch.value if self.facts.arch else None
        return {
            "file": self.file,
            "qemu_version": facts.pop("qemu_version"),
            "arch": facts.pop("arch"),
            "variant": self.name.variant if self.name else None,
            "accelerator": facts.pop("accelerator"),
            "sessions": facts.pop("sessions"),
            "verdict": self.verdict.value,
            "reasons": self.reasons,
            "warnings": self.warnings,
            "expects_real": self.expects_real,
            "layout": self.layout.value if self.layout else None,
            **facts,
        }


def inspect(dump: Dump, name: DumpName | None = None) -> Inspection:
    """Facts and verdict of a parsed dump; ``name`` is its libvirt file name, if it has one."""
    facts = read_facts(dump)
    if name is not None and name.variant == "hvf" and facts.accelerator == "tcg" and facts.sessions == 2:
        facts.accelerator = "hvf"  # HVF answers query-kvm with false; its second session tells
    reasons: list[str] = [f"{p.line}: {p.message}" for p in dump.problems]
    warnings: list[str] = []
    if facts.qemu_version is None:
        reasons.append("no query-version reply: not a qemucapsprobe dump")
    if facts.arch is None:
        reasons.append(f"no usable query-target reply (target {facts.target!r})")
    if name is not None:
        reasons += _name_disagreements(name, facts)
        proof, doubt = _variant_problems(dump, facts, name)
        reasons += proof
        warnings += doubt
    reasons += _session_problems(facts, name)
    warnings += _build_warnings(facts)
    if reasons:
        return Inspection(dump.path, name, dump.layout, facts, Verdict.invalid, reasons, warnings)
    verdict, why = _judge(facts)
    return Inspection(dump.path, name, dump.layout, facts, verdict, why, warnings)


def unreadable(file: str, name: DumpName | None, reason: str) -> Inspection:
    """The inspection of a file that could not be read as a dump (a FIFO, not UTF-8, too large)."""
    return Inspection(file, name, None, Facts(), Verdict.invalid, [reason], [])


def read_facts(dump: Dump) -> Facts:
    facts = Facts(sessions=len(dump.sessions))
    version = _result(dump, "query-version")
    if isinstance(version, dict):
        try:
            facts.qemu_version = QemuVersion.from_reply(version["qemu"])
        except (KeyError, TypeError, ValueError):
            pass
        package = version.get("package")
        facts.package = package if isinstance(package, str) else None
    target = _result(dump, "query-target")
    if isinstance(target, dict):
        facts.target = target.get("arch")
        try:
            facts.arch = Architecture.from_qemu_target(str(facts.target))
        except Exception:
            facts.arch = None
    facts.accelerator, facts.accelerators_present = _accelerator(dump)
    facts.host_cpu_expanded = any(
        isinstance(model := ex.arguments.get("model"), dict) and model.get("name") == "host" and "return" in ex.reply
        for ex in (dump.sessions[0] if dump.sessions else [])
        if ex.execute == "query-cpu-model-expansion"
    )
    facts.machine_types = _count(dump, "query-machines")
    facts.cpu_models = _count(dump, "query-cpu-definitions")
    facts.device_types = _count(dump, "qom-list-types")
    return facts


def _accelerator(dump: Dump) -> tuple[str, list[str]]:
    accelerators = _result(dump, "query-accelerators")
    if isinstance(accelerators, dict) and isinstance(accelerators.get("enabled"), str):
        present = accelerators.get("present") or []
        return accelerators["enabled"], [str(a) for a in present] if isinstance(present, list) else []
    kvm = _result(dump, "query-kvm")
    if isinstance(kvm, dict):
        present = ["kvm"] if kvm.get("present") else []
        return ("kvm" if kvm.get("enabled") is True else "tcg"), present
    return "unknown", []


def _judge(facts: Facts) -> tuple[Verdict, list[str]]:
    arch = facts.arch
    if facts.accelerator in ("kvm", "mshv"):
        return Verdict.real, [f"probed with {facts.accelerator.upper()} (plus the TCG-only session)"]
    if facts.accelerator == "hvf":
        return Verdict.real, ["+hvf dump: probed with macOS Hypervisor.framework (two sessions, KVM not used)"]
    if arch and arch.needs_hardware:
        why = (
            f"FAKE: TCG only, no KVM: libvirt expects {arch.value} dumps from real {arch.value} hardware "
            "with a usable /dev/kvm"
        )
    else:
        why = f"TCG only: normal for {arch.value if arch else 'this arch'} (libvirt keeps it as a fake)"
    return Verdict.fake, [why]


def _name_disagreements(name: DumpName, facts: Facts) -> list[str]:
    reasons = []
    if facts.arch is not None and facts.arch is not name.arch:
        reasons.append(f"named {name.arch.value} but QEMU's target is {facts.target}")
    version = facts.qemu_version
    if version is not None and name.version not in version.release_names():
        belongs = " or ".join(str(v) for v in version.release_names())
        reasons.append(f"named {name.version} but QEMU reports {version}: belongs under {belongs}")
    return reasons


# what a variant's dump must show: the query that answers only where the feature is usable
_VARIANT_PROOF = {"amdsev": "query-sev-capabilities", "sgx": "query-sgx-capabilities",
                  "inteltdx": "query-tdx-capabilities"}


def _variant_problems(dump: Dump, facts: Facts, name: DumpName) -> tuple[list[str], list[str]]:
    """(reasons, warnings): does the dump show the feature its variant names?"""
    variant = name.variant
    if variant == "mshv" and facts.accelerator != "mshv":
        return [f"named +mshv but probed with {facts.accelerator}"], []
    command = _VARIANT_PROOF.get(variant or "")
    if command is None:
        return [], []
    ex = dump.find(command)
    if ex is None:
        return [], [f"+{variant} not confirmed: the probe did not ask {command}"]
    try:
        reply = ex.reply
    except ValueError:
        return [], []  # unreadable replies are the validation's problem
    if "return" not in reply:
        error = reply.get("error")
        desc = error.get("desc") if isinstance(error, dict) else None
        return [f"named +{variant} but {command} failed: {desc or 'no return'}"], []
    return [], []


def _session_problems(facts: Facts, name: DumpName | None) -> list[str]:
    variant = name.variant if name else None
    if facts.accelerator in ("kvm", "mshv") and facts.sessions < 2:
        return [f"{facts.accelerator.upper()} enabled but no second (TCG-only) probe session"]
    if facts.accelerator in ("kvm", "mshv") and variant == "hvf":
        return [f"named +hvf but probed with {facts.accelerator.upper()}"]
    if facts.accelerator == "hvf" and variant != "hvf":
        return ["probed with HVF but not named +hvf"]
    if facts.sessions > 2:
        return [f"{facts.sessions} probe sessions (expected 1 for TCG, 2 when accelerated)"]
    return []


def _build_warnings(facts: Facts) -> list[str]:
    warnings = []
    version = facts.qemu_version
    package = facts.package or ""
    if package and not _VANILLA.fullmatch(package):
        if re.fullmatch(r"v[0-9.]+(-rc[0-9]+)?-[0-9]+-g[0-9a-f]+", package):
            warnings.append(f"QEMU built from git between releases ({package})")
        else:
            warnings.append(f"QEMU build is not a vanilla release: package {package!r}")
    if version is not None and version.is_development:
        warnings.append(f"development QEMU {version}: filed under the next release")
    elif version is not None and version.micro != 0:
        warnings.append(f"micro version {version} (filed under {version.major}.{version.minor}.0)")
    return warnings


def _result(dump: Dump, execute: str) -> Any:
    ex = dump.find(execute)
    if ex is None:
        return None
    try:
        return ex.result
    except ValueError:
        return None


def _count(dump: Dump, execute: str) -> int:
    result = _result(dump, execute)
    return len(result) if isinstance(result, list) else 0
