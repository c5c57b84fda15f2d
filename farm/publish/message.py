"""The texts of a publication: commit messages, the merge request description, the cover letter.

Commit messages follow libvirt's own "qemucapabilitiesdata: Update test data for qemu-X.Y.0 on
ARCH" commits: the subject, then a short body wrapped at 72 columns — which QEMU build (tag or
commit, package string) was probed on which host (CPU model, kernel), and a few lines of notable
changes (QMP commands, machine types and CPU models added or removed: counts and the first few
names). Nothing internal to the farm (no run or job numbers); ``git commit -s`` adds the
Signed-off-by trailer. The full semantic diff and the farm's provenance go where reviewers look
for details: the merge request description (Markdown, long lists folded) and the cover letter
(plain text, wrapped, long lists folded to their first items).
"""

from __future__ import annotations

import re
import textwrap
from typing import TYPE_CHECKING

from farm.caps.diff import Change, DumpDiff

if TYPE_CHECKING:
    from farm.publish.publisher import Placed

WIDTH = 72  # columns of a commit message body and of the cover letter
NOTABLE = ("QMP commands", "Machine types", "CPU models")  # the sections a commit message names
NAMES = 3  # names shown per notable change
COVER_ITEMS = 20  # items shown per section of the cover letter's diff


def _wrap(text: str, indent: str = "", subsequent: str | None = None) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent,
                         subsequent_indent=indent if subsequent is None else subsequent,
                         break_long_words=True, break_on_hyphens=False) or [""]


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:NAMES])
    return shown + (f", {len(items) - NAMES} more" if len(items) > NAMES else "")


def _notable(change: Change) -> str:
    parts = []
    for what, items in (("added", change.added), ("removed", change.removed)):
        if items:
            parts.append(f"{len(items)} {what} ({_names(items)})")
    if change.changed:
        parts.append(f"{len(change.changed)} changed")
    return f"{change.title}: " + "; ".join(parts)


def qemu_build(placed: Placed) -> str:
    """'QEMU 9.2.0 (tag v9.2.0, package 'v9.2.0')': the version, the tag or commit when known (a
    farm build's commit or ref, or a package string that is a tag), and the package string."""
    facts = placed.inspection.facts if placed.inspection else None
    qemu = placed.provenance.get("qemu") or {}
    version = str(facts.qemu_version) if facts and facts.qemu_version else (qemu.get("version") or "?")
    package = facts.package if facts else None
    origin = str(qemu.get("origin") or "")
    parts = []
    if qemu.get("commit"):
        parts.append(f"commit {str(qemu['commit'])[:12]}")
    elif origin.startswith("git:") and re.fullmatch(r"v[0-9][\w.+-]*", origin.rpartition("@")[2]):
        parts.append(f"tag {origin.rpartition('@')[2]}")
    elif package and re.fullmatch(r"v[0-9]+\.[0-9]+\.[0-9]+(-rc[0-9]+)?", package):
        parts.append(f"tag {package}")
    parts.append(f"package '{package}'" if package else "no package string")
    return f"QEMU {version} ({', '.join(parts)})"


def host(placed: Placed) -> str:
    """'x86_64, AMD EPYC 7B13, Linux 6.1.0-18-amd64': the host's arch, CPU model and kernel."""
    facts = (placed.provenance.get("host") or {}).get("facts") or {}
    parts = [facts.get("arch") or placed.arch.split("+")[0], facts.get("cpu_model") or "CPU unknown"]
    return ", ".join(parts + ([f"Linux {facts['kernel']}"] if facts.get("kernel") else ["kernel unknown"]))


def accelerator(placed: Placed) -> str:
    facts = placed.inspection.facts if placed.inspection else None
    name = facts.accelerator if facts else "unknown"
    return {"kvm": "KVM", "tcg": "TCG only", "hvf": "HVF", "mshv": "MSHV"}.get(name, name)


def commit_message(placed: Placed) -> str:
    """The commit message of one dump (without the Signed-off-by trailer git adds)."""
    body = _wrap(f"Probed {qemu_build(placed)} with {accelerator(placed)}; host {host(placed)}.")
    body.append("")
    change = placed.diff
    if change is None:
        body += _wrap(f"The first test data of {placed.arch}: there is no earlier dump to compare with.")
    else:
        against = "" if placed.action == "Update" else f" against {placed.compared_with}"
        notable = [c for c in change.features if c.title in NOTABLE]
        if notable:
            body.append(f"Notable changes{against}:")
            body.append("")
            for c in notable:
                body += _wrap(_notable(c), "- ", "  ")
        else:
            body += _wrap(f"No QMP commands, machine types or CPU models added or removed{against}.")
        others = [c.title for c in change.features if c.title not in NOTABLE]
        environment = [c.title for c in change.environment]
        if others or environment:
            body.append("")
            if others:
                body += _wrap(f"Other changes: {', '.join(others)}.")
            if environment:
                body += _wrap(f"Changes of the host and accelerator: {', '.join(environment)}.")
    return "\n".join([placed.subject, "", *body]) + "\n"


def provenance_lines(placed: Placed, run: int) -> list[str]:
    """The farm's record of how the dump was made (for the merge request and the cover letter)."""
    p = placed.provenance
    machine = p.get("host") or {}
    facts = machine.get("facts") or {}
    libvirt = p.get("libvirt") or {}
    qemu = p.get("qemu") or {}
    verdict = p.get("verdict") or {}
    return [
        f"Host: {machine.get('name', '?')}: {facts.get('cpu_model') or '?'}, {facts.get('arch') or '?'}, "
        f"kernel {facts.get('kernel') or '?'}",
        f"QEMU: {qemu.get('version_line') or qemu.get('version') or '?'} ({qemu.get('origin') or '?'})",
        f"Probe: qemucapsprobe of libvirt {libvirt.get('libvirt_version') or '?'} "
        f"({libvirt.get('source') or '?'}" + (f", commit {libvirt['commit']}" if libvirt.get("commit") else "") + ")",
        f"Verdict: {verdict.get('verdict', '?')} (farm run {run}, job {placed.job})",
    ]


def _no_diff(placed: Placed) -> str:
    return "No earlier dump of this arch to compare with."


def description(placed: list[Placed], run: int, warnings: list[str] | None = None) -> str:
    """Markdown for the merge request: each dump's full semantic diff (long lists folded), its
    provenance, and the dumps' warnings."""
    out = [f"QEMU capabilities test data from farm run {run}.", ""]
    if warnings:
        out += ["Warnings:", "", *(f"- {w}" for w in warnings), ""]
    for p in placed:
        out += [f"## {p.subject}", ""]
        out += [p.diff.to_markdown() if p.diff else _no_diff(p), ""]
        out += [f"- {line}" for line in provenance_lines(p, run)] + [""]
    return "\n".join(out)


def _folded_text(change: DumpDiff) -> list[str]:
    """The full diff as plain text, wrapped at WIDTH, each section folded to COVER_ITEMS items."""
    out = []
    for line in change.to_text(limit=COVER_ITEMS).splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        out += _wrap(line.strip(), indent, indent + "    ")
    return out


def cover_blurb(placed: list[Placed], run: int, warnings: list[str] | None = None) -> str:
    """The cover letter's text: the commits, the dumps' warnings, each dump's diff and provenance."""
    out = _wrap(f"QEMU capabilities test data from farm run {run}. Each commit passes libvirt's "
                "capability tests (qemucapabilitiestest, domaincapstest, qemuxmlconftest) after "
                "regenerating their outputs.")
    out.append("")
    for p in placed:
        out += _wrap(p.subject + (f" (against {p.compared_with})" if p.compared_with else ""), "  ", "    ")
    if warnings:
        out += ["", "Warnings:"]
        for w in warnings:
            out += _wrap(w, "  ", "    ")
    for p in placed:
        out += ["", p.subject.removeprefix("qemucapabilitiesdata: "), ""]
        out += _folded_text(p.diff) if p.diff else [_no_diff(p)]
        out.append("")
        for line in provenance_lines(p, run):
            out += _wrap(line, "  ", "    ")
    return "\n".join(out)


def title(placed: list[Placed], qemu: str) -> str:
    """The merge request's title (and the cover letter's subject)."""
    if len(placed) == 1:
        return placed[0].subject
    return f"qemucapabilitiesdata: test data for qemu-{qemu} on {', '.join(p.arch for p in placed)}"
