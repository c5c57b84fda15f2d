"""Nightly runs: discover QEMU releases, probe what the ledger and the libvirt tree lack, publish.

One pass (``farm nightly --once``):

1. discover: ``git ls-remote --tags QEMU_GIT_URL`` gives the tags ``vX.Y.Z`` (releases) and
   ``vX.Y.Z-rcN`` (release candidates); ``git ls-remote QEMU_GIT_URL HEAD`` the development head.
   libvirt files its dumps per ``X.Y.0``, so the candidates are the ``X.Y.0`` releases at or above
   ``nightly_min_qemu``: the release when it is tagged, else its newest release candidate (probed
   as ``X.Y.0``: a release candidate reports ``X.(Y-1).9N`` and is filed under ``X.Y.0``). Stable
   releases ``X.Y.Z`` (Z > 0) are listed only.
   The development head (unless ``nightly_head`` is off): if the newest release line among the
   tags is released (``vX.Y.0`` is tagged, not just its rcs), the head is the development of the
   next release NEXT (QEMU's convention: after X.2 comes (X+1).0, else X.(Y+1).0) and is one more
   candidate, ``HEAD``: release NEXT built at the head's commit (pinned at discovery, so every arch
   builds the same commit; a development QEMU X.Y.50 is filed under NEXT), for the arches (and
   variants) that have a host building QEMU from git (``toolchain.qemu`` ``git:URL@REF``; others:
   skipped, with why). If the newest line is still in release candidates, the head is that
   release in freeze, covered by its newest rc: noted, not planned.
2. plan, for each candidate x each arch and variant the inventory's hosts produce (every host its
   arch, plain, and each of its ``variants``: x86_64, x86_64+amdsev, ...), from the ledger's final
   jobs of that release, arch and variant (any run):
   - a result is *current* when it was made with the current libvirt probe of a host producing
     that arch and variant (provenance ``libvirt.source`` equal to the toolchain's ``libvirt``,
     and ``libvirt.commit`` equal to the toolchain's commit when that is known: a ``git:URL@REF``
     toolchain is resolved with ``git ls-remote``) and with QEMU of the current candidate (a
     result of a release candidate is not current once the release or a later candidate is
     tagged, a result of the development head once an rc or the release is tagged; a head result
     is current while its QEMU commit is the head's: a head that moved makes it stale);
   - a current ``ok`` result with verdict ``real``: covered, nothing to do;
   - a current ``ok`` (fake, TCG), ``fake`` or ``invalid`` result: tried, not retried (the same
     toolchain would give the same answer) until the toolchain or the tag changes;
   - a current ``wrong-version`` result settles the candidate only for the hosts that would run
     the same QEMU: for any host building the same ``git:URL@REF``, for the host itself when its
     QEMU is its own (``system``, ``binary:``, ``tarball:``); while other hosts of the arch could
     produce the release (e.g. build it from git), it is probed on those only (*untried on ...*);
   - only results that are not current: *stale*, probed again;
   - no result at all: covered when the libvirt tree has a real dump of it (not for the head: the
     tree's dump of the next release is of an older development QEMU), else *missing*, probed;
   - infrastructure failures (``failed``, ``timeout``) are not results: probed again next night.
3. probe: one run per release and variant (farm.run.probe, embedded or on the broker), over the
   arches planned; the head's run builds QEMU at the head's commit (``qemu_ref``).
4. publish (with ``publish``): each run through farm.publish.publisher; a run without a dump to
   publish, or whose dumps equal the tree's, publishes nothing.

A second pass the same night plans nothing: the first pass' results are current ledger entries.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import subprocess
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.caps.names import column
from farm.caps.version import QemuVersion
from farm.errors import FarmError, UsageError
from farm.jobs import Job, qemu_origin
from farm.ledger import ANSWERS, Ledger

_TAG = re.compile(r"v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-rc([0-9]+))?")
_HEX40 = re.compile(r"[0-9a-f]{40}")
TRIED = ANSWERS  # final statuses that are an answer, not an accident
GIT_TIMEOUT = 300
HEAD = "HEAD"  # the development head's name among the candidates


@dataclass(frozen=True)
class Tag:
    """A candidate: a release tag, a release candidate's tag, or the development head (``HEAD``)."""

    name: str
    version: QemuVersion  # the release it is of (a release candidate: the release it leads to)
    rc: int | None = None
    commit: str | None = None  # the head: the commit its results must have been built from

    @property
    def ref(self) -> str | None:
        """What a host must build QEMU at: the head's commit, an rc's tag; None for a release
        (built from its tag vX.Y.Z, or a host's installed QEMU of that release)."""
        return self.commit or (self.name if self.rc is not None else None)

    def to_json(self) -> dict:
        return {"tag": self.name, "version": str(self.version), "rc": self.rc}


@dataclass
class Discovery:
    url: str
    tags: list[Tag]
    head: str | None

    def candidates(self, minimum: QemuVersion) -> list[Tag]:
        """Per X.Y.0 release at or above ``minimum``: its tag, else its newest release candidate."""
        best: dict[QemuVersion, Tag] = {}
        for t in self.tags:
            if t.version.micro or t.version < minimum:
                continue
            old = best.get(t.version)
            if old is None or _rank(t) > _rank(old):
                best[t.version] = t
        return [best[v] for v in sorted(best)]

    def development(self, minimum: QemuVersion) -> tuple[Tag | None, str]:
        """The development head as a candidate (None: not one) and a note saying what it is."""
        if not self.head:
            return None, "no development head"
        if not self.tags:
            return None, f"development head {self.head[:12]}: no release tag to tell its release by"
        newest = max(t.version for t in self.tags)
        line = QemuVersion(newest.major, newest.minor)
        if not any(t.version == line and t.rc is None for t in self.tags):
            rc = max((t for t in self.tags if t.version == line), key=_rank)
            return None, f"development head {self.head[:12]}: QEMU {line} in freeze, covered by {rc.name}"
        following = line.next_release()
        if following < minimum:
            return None, f"development head {self.head[:12]}: QEMU {following} is below the minimum {minimum}"
        return Tag(HEAD, following, commit=self.head), f"development head {self.head[:12]}: QEMU {following}"

    def to_json(self) -> dict:
        return {"url": self.url, "head": self.head, "tags": [t.to_json() for t in self.tags]}


def _rank(t: Tag) -> int:
    return 1_000_000 if t.rc is None else t.rc


@dataclass
class Item:
    qemu: str
    tag: str  # vX.Y.Z, vX.Y.Z-rcN or HEAD
    arch: str
    action: str  # probe | skip
    why: str  # missing | stale: ... | covered | tried: STATUS | untried on ... | in tree | head: no host ...
    ref: str | None = None  # the head's commit or an rc's tag: what to build QEMU at
    variant: str | None = None
    hosts: list[str] | None = None  # probe only on these (None: any host of the arch and variant)

    @property
    def column(self) -> str:
        return column(self.arch, self.variant)

    def to_json(self) -> dict:
        return {"qemu": self.qemu, "tag": self.tag, "ref": self.ref, "arch": self.arch, "variant": self.variant,
                "action": self.action, "why": self.why, "hosts": self.hosts}


@dataclass
class Pass:
    discovery: Discovery
    items: list[Item]
    dry_run: bool
    runs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def plan(self) -> list[Item]:
        return [i for i in self.items if i.action == "probe"]

    @property
    def failed(self) -> bool:
        return any(j["status"] in ("failed", "timeout") for r in self.runs for j in r["jobs"]) or any(
            "error" in (r.get("publication") or {}) for r in self.runs)

    def to_json(self) -> dict:
        return {"qemu": self.discovery.to_json(), "dry_run": self.dry_run,
                "plan": [i.to_json() for i in self.plan],
                "skipped": [i.to_json() for i in self.items if i.action == "skip"],
                "runs": self.runs, "notes": self.notes}


# ------------------------------------------------------------------------------ discovery


def _git(*args: str) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        done = subprocess.run(["git", *args], check=False, capture_output=True, text=True, timeout=GIT_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        raise FarmError(f"git {' '.join(args)}: no answer within {GIT_TIMEOUT} s") from None
    if done.returncode:
        raise FarmError(f"git {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def parse_tags(ls_remote: str) -> list[Tag]:
    """The release and release-candidate tags of ``git ls-remote --tags`` output."""
    tags: dict[str, Tag] = {}
    for line in ls_remote.splitlines():
        _, _, ref = line.partition("\t")
        name = ref.removeprefix("refs/tags/").removesuffix("^{}")
        m = _TAG.fullmatch(name)
        if m:
            tags[name] = Tag(name, QemuVersion(int(m[1]), int(m[2]), int(m[3])), int(m[4]) if m[4] else None)
    return sorted(tags.values(), key=lambda t: (t.version, _rank(t)))


def discover(url: str) -> Discovery:
    if url.startswith("-"):
        raise UsageError(f"FARM_QEMU_GIT_URL {url!r}: starts with '-'")
    tags = parse_tags(_git("ls-remote", "--tags", "--", url))
    head = _git("ls-remote", "--", url, "HEAD").split("\t", 1)[0].strip() or None
    return Discovery(url, tags, head)


# ------------------------------------------------------------------------------ planning


def current_libvirt(hosts: list, resolve: Callable[[str, str], str | None]) -> list[dict]:
    """The libvirt probe sources of ``hosts``: {"source", "commit" (None: not known)}."""
    found = []
    for host in hosts:
        source = host.toolchain.libvirt_source
        commit = None
        if source.kind == "git":
            commit = source.ref if _HEX40.fullmatch(source.ref) else resolve(source.location, source.ref)
        entry = {"source": host.toolchain.libvirt, "commit": commit}
        if entry not in found:
            found.append(entry)
    return found


def _ls_remote_ref(url: str, ref: str) -> str | None:
    try:
        out = _git("ls-remote", "--", url, ref, f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}")
    except FarmError:
        return None
    lines = [line.split("\t") for line in out.splitlines() if "\t" in line]
    peeled = [sha for sha, name in lines if name.endswith("^{}")]
    found = peeled or [sha for sha, _ in lines]
    return found[0] if found else None


def _made_with(provenance: dict | None, libvirts: list[dict]) -> bool:
    made = (provenance or {}).get("libvirt") or {}
    return any(made.get("source") == lv["source"] and (lv["commit"] is None or made.get("commit") == lv["commit"])
               for lv in libvirts)


def _of_candidate(provenance: dict | None, tag: Tag) -> bool:
    """Was the result made with QEMU of ``tag`` (a release: not a development QEMU; rcN: rcN or later;
    the head: built at its commit)?"""
    p = provenance or {}
    if tag.commit:
        return (p.get("qemu") or {}).get("commit") == tag.commit
    text = (((p.get("verdict") or {}).get("facts") or {}).get("qemu_version")  # the dump's own query-version
            or (p.get("qemu") or {}).get("version"))
    try:
        made = QemuVersion.parse(str(text).split()[0]) if text else None
    except (UsageError, IndexError):
        made = None
    if made is None:
        return True  # cannot tell: trust the run's release
    if tag.rc is None:
        return not made.is_development
    return not made.is_development or made.micro >= 90 + tag.rc


def ledger_results(ledger: Ledger) -> dict[tuple[str, str, str | None], list]:
    """Final jobs by (release, arch, variant), newest first."""
    results: dict[tuple[str, str, str | None], list] = {}
    for run in ledger.runs(limit=-1):
        for job in run.jobs:
            if job.final:
                results.setdefault((run.qemu, job.arch, job.variant), []).append(job)
    return results


def tree_real(tree: Path | None) -> set[tuple[str, str, str | None]]:
    """(release, arch, variant) of the libvirt tree's real dumps."""
    if tree is None:
        return set()
    from farm.coverage import coverage

    real = set()
    for c in coverage(tree).cells:
        if c.inspection.verdict.value == "real":
            arch, _, variant = c.column.partition("+")
            real.add((str(c.version), arch, variant or None))
    return real


def producers(inventory) -> dict[tuple[str, str | None], list]:
    """The hosts that can probe each (arch, variant) of the inventory: every host its plain arch,
    the hosts declaring a variant that variant too; in inventory order."""
    found: dict[tuple[str, str | None], list] = {}
    for host in inventory.hosts:
        for variant in (None, *host.variants):
            found.setdefault((host.arch.value, variant), []).append(host)
    return found


def plan(discovery: Discovery, minimum: QemuVersion, inventory, ledger: Ledger, tree: Path | None,
         resolve: Callable[[str, str], str | None] = _ls_remote_ref, head: Tag | None = None) -> list[Item]:
    """The items of a pass: the candidates of ``discovery`` and the development ``head``, per arch
    and variant the inventory's hosts can probe."""
    columns = producers(inventory)
    results = ledger_results(ledger)
    in_tree = tree_real(tree)
    libvirts = {col: current_libvirt(hosts, resolve) for col, hosts in columns.items()}
    items = []
    for tag in discovery.candidates(minimum) + ([head] if head else []):
        qemu = str(tag.version)
        for (arch, variant), hosts in columns.items():
            if tag.ref and not any(h.toolchain.qemu_from_git for h in hosts):
                what = "head" if tag.commit else tag.name
                items.append(Item(qemu, tag.name, arch, "skip",
                                  f"{what}: no host of {column(arch, variant)} builds QEMU from git", tag.ref, variant))
                continue
            libvirt = libvirts[(arch, variant)]
            jobs = results.get((qemu, arch, variant), [])
            answers = [j for j in jobs if j.status in TRIED]
            current = [j for j in answers if _made_with(j.provenance, libvirt) and _of_candidate(j.provenance, tag)]
            settled = [j for j in current if j.status != "wrong-version"]
            wrong = [j for j in current if j.status == "wrong-version"]
            untried = [h for h in hosts if (h.toolchain.qemu_from_git or not tag.ref)
                       and not any(_settles(j, h, tag, arch, variant) for j in wrong)]
            only = None
            if any(j.status == "ok" and j.verdict == "real" for j in current):
                action, why = "skip", "covered"
            elif settled or (wrong and not untried):
                action, why = "skip", f"tried: {(settled or wrong)[0].status} (run {(settled or wrong)[0].run})"
            elif wrong:
                only = [h.name for h in untried]
                action, why = "probe", (f"untried on {', '.join(only)}: run {wrong[0].run} got wrong-version from "
                                        f"QEMU {_origin(wrong[0])} on {wrong[0].host}")
            elif answers:
                action, why = "probe", _stale_reason(answers[0], libvirt, tag)
            elif (qemu, arch, variant) in in_tree and not tag.commit:
                action, why = "skip", "in tree"
            else:
                action, why = "probe", "missing" if not jobs else f"missing (last: {jobs[0].status}, run {jobs[0].run})"
            items.append(Item(qemu, tag.name, arch, action, why, tag.ref, variant, only))
    return items


def _origin(job) -> str | None:
    """Where the QEMU of a job's result came from (provenance ``qemu.origin``; None: not known)."""
    origin = ((job.provenance or {}).get("qemu") or {}).get("origin")
    return origin if isinstance(origin, str) else None


def _settles(job, host, tag: Tag, arch: str, variant: str | None) -> bool:
    """Does ``job``'s wrong-version answer settle ``tag`` for ``host``, i.e. would ``host`` build or run
    the same QEMU? A git build of the same URL and ref would, on any host; a host's own QEMU (``system``,
    ``binary:``, ``tarball:``) says nothing of another host's."""
    made = _origin(job)
    mine = qemu_origin(host, Job(job.run, str(tag.version), arch, variant, qemu_ref=tag.ref))
    if made and made.startswith("git:"):
        return made == mine
    return job.host == host.name and made in (None, mine)


def _stale_reason(job, libvirts: list[dict], tag: Tag) -> str:
    if not _made_with(job.provenance, libvirts):
        made = (job.provenance or {}).get("libvirt") or {}
        return f"stale: run {job.run} used libvirt {made.get('source')} ({made.get('commit') or 'no commit'})"
    if tag.commit:
        built = ((job.provenance or {}).get("qemu") or {}).get("commit")
        if built:
            return f"stale: head moved from {built[:12]} to {tag.commit[:12]}"
        return f"stale: run {job.run} did not build QEMU from git (head {tag.commit[:12]})"
    return f"stale: run {job.run} probed an older QEMU than {tag.name}"


# ------------------------------------------------------------------------------ a pass


@contextmanager
def _exclusive(state_dir: Path):
    """One nightly pass at a time (cron and a beat entry may overlap)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "nightly.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another farm nightly is running (lock {state_dir / 'nightly.lock'})") from None
        yield


def scheduled_pass(inventory, broker: str, say: Callable[[str], None]) -> dict:
    """The pass `farm beat` asks the coordinator worker for: ``run_pass`` (which holds the nightly
    lock) with the FARM_* settings and this machine's ledger, its jobs sent through ``broker``,
    publishing with FARM_NIGHTLY_PUBLISH into FARM_LIBVIRT_CHECKOUT; its JSON summary."""
    from farm.config import settings
    from farm.publish import publisher

    s = settings()
    result = run_pass(s, inventory, Ledger(s.state_dir, s.quarantine_after), s.libvirt_checkout,
                      publish=s.nightly_publish, broker=broker, say=say,
                      publish_options=lambda: publisher.options_from_settings(s, s.libvirt_checkout))
    return result.to_json()


def run_pass(settings, inventory, ledger: Ledger, tree: Path | None = None, dry_run: bool = False,
             publish: bool = False, broker: str | None = None, say: Callable[[str], None] | None = None,
             publish_options: Callable[[], Any] | None = None) -> Pass:
    """One nightly pass: discover, plan, probe, publish (see the module's description)."""
    from farm.run import probe

    say = say or (lambda message: None)
    minimum = QemuVersion.parse(settings.nightly_min_qemu)
    with _exclusive(settings.state_dir):
        say(f"discovering QEMU releases of {settings.qemu_git_url}")
        discovery = discover(settings.qemu_git_url)
        head, note = discovery.development(minimum)
        if head and not settings.nightly_head:
            head, note = None, f"{note}: not probed (FARM_NIGHTLY_HEAD is off)"
        items = plan(discovery, minimum, inventory, ledger, tree, head=head)
        result = Pass(discovery, items, dry_run, notes=[note])
        if dry_run:
            return result
        by_run: dict[tuple[str, str | None, str | None], list[Item]] = {}
        for item in result.plan:
            by_run.setdefault((item.qemu, item.ref, item.variant), []).append(item)
        for (qemu, ref, variant), planned in by_run.items():
            archs = [i.arch for i in planned]
            say(f"probing QEMU {qemu}{f' at {ref}' if ref else ''} on {', '.join(column(a, variant) for a in archs)}")
            record = probe(inventory, qemu, ",".join(archs), ledger, variant=variant, broker=broker, qemu_ref=ref,
                           progress=lambda job, message: say(f"{job}: {message}"), only=_hosts_of(planned, inventory))
            entry: dict[str, Any] = {"run": record.id, "qemu": qemu, "ref": ref, "variant": variant, "jobs": [
                {"arch": j.arch, "variant": j.variant, "status": j.status, "verdict": j.verdict, "host": j.host,
                 "reasons": j.reasons}
                for j in record.jobs]}
            if publish:
                entry["publication"] = _publish(ledger, record, publish_options, say)
                publication = entry["publication"]
                say(f"run {record.id}: publish: {publication.get('message') or publication.get('error')}")
            result.runs.append(entry)
        return result


def _hosts_of(planned: list[Item], inventory) -> list[str] | None:
    """The hosts a run of ``planned`` items may use: None (any) unless an item is limited to some
    hosts (the others already answered it), then each item's hosts (or all of its arch's)."""
    if all(i.hosts is None for i in planned):
        return None
    columns = producers(inventory)
    names: list[str] = []
    for i in planned:
        names += i.hosts if i.hosts is not None else [h.name for h in columns[(i.arch, i.variant)]]
    return list(dict.fromkeys(names))


def _publish(ledger: Ledger, record, options: Callable[[], Any] | None, say) -> dict:
    from farm.publish import publisher

    if not any(j.status == "ok" for j in record.jobs):
        return {"status": "nothing", "message": f"run {record.id}: no ok dump, nothing to publish"}
    try:
        if options is None:
            raise UsageError("publishing needs its options (publish_options)")
        publication = publisher.publish(ledger, record.id, options(), say)
    except (publisher.PublishError, UsageError) as e:  # e.g. no libvirt checkout configured
        return {"status": "error", "error": str(e)}
    return {"status": publication.status, "message": publication.message, "branch": publication.branch,
            "commits": publication.commits, "mr_url": publication.mr_url, "skipped": publication.skipped,
            "warnings": publication.warnings}


def next_time(expression: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """The next time a cron expression (5 fields, local time) fires after ``now``."""
    from celery.schedules import crontab

    try:
        cron = crontab.from_string(expression)
    except (ValueError, TypeError) as e:
        raise UsageError(f"FARM_NIGHTLY_CRON: bad cron expression {expression!r}: {e}") from None
    now = now or datetime.datetime.now().astimezone()
    cron.nowfun = lambda: now
    cron.tz = now.tzinfo
    return now + cron.remaining_estimate(now)


def render(result: Pass) -> str:
    lines = [f"QEMU {result.discovery.url}: {len(result.discovery.tags)} release tag(s)"]
    for item in result.items:
        label = f"{item.tag} {item.qemu}" if item.ref else item.tag
        lines.append(f"  {label:<14} {item.column:<15} {'PROBE' if item.action == 'probe' else 'skip ':5} {item.why}")
    if not result.plan:
        lines.append("nothing to probe")
    elif result.dry_run:
        lines.append(f"dry run: would probe {len(result.plan)} job(s)")
    for r in result.runs:
        at = f" at {r['ref'][:12]}" if r.get("ref") else ""
        jobs = ", ".join(f"{column(j['arch'], j['variant'])} {j['status']}" for j in r["jobs"])
        lines.append(f"run {r['run']}: QEMU {r['qemu']}{at}: {jobs}")
        if r.get("publication"):
            p = r["publication"]
            lines.append(f"  publish: {p.get('message') or p.get('error')}")
    lines += result.notes
    return "\n".join(lines)


def to_json_text(result: Pass) -> str:
    return json.dumps(result.to_json(), indent=2)
