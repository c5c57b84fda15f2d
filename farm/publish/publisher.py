"""Publish a run's dumps into a libvirt checkout: a branch, one tested commit per arch, delivery.

``publish()`` is what ``farm publish RUN`` and ``farm probe --publish`` call:

1. check everything that can be checked without touching the checkout: the run's dumps — each valid,
   real (or a fake of an arch libvirt fakes anyway, unless ``allow_fake``) and a QEMU build upstream
   takes (``farm.publish.upstream``, unless ``allow_distro_build``); a dump that is not is skipped
   and reported (``strict``: the whole run is refused) —, the token and project for ``mr``, the
   commit identity, a clean checkout;
2. fetch the upstream remote and start a branch ``qemucaps/qemu-X.Y.0-YYYYMMDD`` from its branch
   (an existing branch of that name is refused);
3. per arch: place the dump under the tree's name and layout (ids renumbered), skip it when its
   semantic diff against the tree's file is empty, regenerate the capability tests' outputs and
   verify them (``tree.regenerate_and_verify``), commit everything that changed with ``git commit -s``
   — so each commit passes libvirt's tests on its own. The commit message is short, in libvirt's
   style (``farm.publish.message``); the full semantic diff goes to the merge request, the cover
   letter and the ledger;
4. deliver: push to the fork remote and create or update the merge request (``mr``), and/or write a
   ``git format-patch --cover-letter`` series (``patches``).

Any failure puts the checkout back as it was: the original branch checked out, the new branch
deleted, no files left behind. Nothing changed means nothing is published (no branch at all).
"""

from __future__ import annotations

import datetime
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from farm.caps import dump as dumps
from farm.caps.diff import DumpDiff, diff
from farm.caps.inspect import Inspection, Verdict, inspect
from farm.caps.names import DumpName, Scheme, column, detect_scheme, place
from farm.errors import OperationalError, UsageError
from farm.ledger import JobRecord, Ledger, PublicationRecord, RunRecord
from farm.publish import message as messages
from farm.publish import mr as merge_requests
from farm.publish import tree as libvirt_tree
from farm.publish import upstream
from farm.publish.git import Git, GitError

Progress = Callable[[str], None]

CAPS_DIR = Path("tests") / "qemucapabilitiesdata"


class PublishError(UsageError):
    """Publishing refused (exit 2); the checkout is as it was before."""


class PublishFailed(OperationalError):
    """Publishing failed on something outside farm: a git remote (exit 3); the checkout is as it was before."""


@dataclass
class Options:
    """Where and how to publish (settings and command-line options resolved by the caller)."""

    checkout: Path
    build_dir: Path
    upstream_remote: str = "origin"
    upstream_branch: str | None = None  # default: the remote's HEAD
    fork_remote: str = "fork"
    mr: bool = False
    mr_method: str = "api"  # api | push-options
    patches: Path | None = None
    dry_run: bool = False
    allow_fake: bool = False
    allow_distro_build: bool = False  # publish QEMU builds upstream would not take (farm.publish.upstream)
    strict: bool = False  # refuse the whole run when one of its dumps cannot be published
    tests: list[str] | None = None  # capability tests to regenerate (default: all the tree has)
    git_name: str | None = None
    git_email: str | None = None
    gitlab_url: str = "https://gitlab.com"
    gitlab_project: str | None = None
    token: Callable[[], str] | None = None  # read only when mr is asked for
    today: datetime.date | None = None


@dataclass
class Placed:
    """One dump of the run, as it would go into the tree."""

    job: str
    arch: str  # with +variant
    version: str
    artifact: Path
    target: Path  # in the checkout
    action: str  # Add | Update | unchanged
    text: str  # the dump in the tree's layout
    diff: DumpDiff | None  # against the tree's file (Update) or the previous version of the arch (Add)
    compared_with: str | None
    provenance: dict
    inspection: Inspection | None = None  # of the run's dump
    commit: str | None = None

    @property
    def subject(self) -> str:
        return f"qemucapabilitiesdata: {self.action} test data for qemu-{self.version} on {self.arch}"

    def to_json(self) -> dict:
        return {"job": self.job, "arch": self.arch, "file": str(self.target), "action": self.action,
                "compared_with": self.compared_with, "subject": self.subject if self.action != "unchanged" else None,
                "commit": self.commit, "warnings": self.inspection.warnings if self.inspection else []}


@dataclass
class Publication:
    run: int
    status: str  # published | unchanged | dry-run
    checkout: Path
    branch: str | None = None
    base: str | None = None
    dumps: list[Placed] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # jobs not published, with the reason
    warnings: list[str] = field(default_factory=list)  # every warning of every dump of the run, "FILE: warning"
    mr_url: str | None = None
    mr_action: str | None = None
    patches: list[Path] = field(default_factory=list)
    record: PublicationRecord | None = None

    @property
    def commits(self) -> list[str]:
        return [d.commit for d in self.dumps if d.commit]

    @property
    def message(self) -> str:
        skipped = f"; {len(self.skipped)} job(s) skipped" if self.skipped else ""
        return self._message() + skipped

    def _message(self) -> str:
        if self.status == "unchanged":
            return f"run {self.run}: nothing changed against {self.checkout}: nothing published"
        changed = [d for d in self.dumps if d.action != "unchanged"]
        if self.status == "dry-run":
            if not changed:
                return f"run {self.run}: nothing changed against {self.checkout}: would publish nothing (dry run)"
            return f"run {self.run}: would publish {len(changed)} dump(s) on branch {self.branch} (dry run)"
        where = [f"branch {self.branch} ({len(self.commits)} commit(s))"]
        if self.mr_url or self.mr_action:
            where.append(f"merge request {self.mr_action}: {self.mr_url or '(by push options)'}")
        if self.patches:
            where.append(f"{len(self.patches)} patch file(s) in {self.patches[0].parent}")
        return f"run {self.run}: published " + ", ".join(where)

    def to_json(self) -> dict:
        return {"run": self.run, "status": self.status, "message": self.message, "checkout": str(self.checkout),
                "branch": self.branch, "base": self.base, "commits": self.commits,
                "dumps": [d.to_json() for d in self.dumps], "skipped": self.skipped, "warnings": self.warnings,
                "mr_url": self.mr_url,
                "mr_action": self.mr_action, "patches": [str(p) for p in self.patches]}


# ------------------------------------------------------------------------------------- checks


@dataclass
class _Candidates:
    chosen: list[tuple[JobRecord, Path, Inspection]]
    skipped: list[str]  # jobs left out, with why
    warnings: list[str]  # of every dump: "FILE: warning"


def _candidates(run: RunRecord, opts: Options, say: Progress) -> _Candidates:
    """The run's dumps fit to publish, the jobs left out with why, and every dump's warnings.

    A dump that cannot be published (invalid; a fake where libvirt expects real hardware, unless
    allow_fake; a QEMU build upstream does not take, unless allow_distro_build) is left out and
    reported; with strict it refuses the whole run. A run with nothing left is refused. Warnings and
    skipped jobs are said as they are found, before any refusal."""
    found = _Candidates([], [], [])
    refused = []
    for job in run.jobs:
        label = column(job.arch, job.variant)
        if not job.artifact:
            found.skipped.append(f"{job.id}: {job.status}, no dump")
            continue
        if job.status == "wrong-version":
            found.skipped.append(f"{job.id}: probed another QEMU release than {run.qemu}")
            continue
        artifact = Path(job.artifact)
        name = DumpName.parse(artifact.name)
        inspection = inspect(dumps.load(artifact), name)
        for warning in inspection.warnings:
            found.warnings.append(f"{artifact.name}: {warning}")
            say(f"warning: {found.warnings[-1]}")
        build = upstream.build_problem(inspection.facts.qemu_version, inspection.facts.package)
        if inspection.verdict is Verdict.invalid:
            refused.append(f"{artifact.name}: invalid dump ({'; '.join(inspection.reasons[:3])})")
        elif inspection.verdict is Verdict.fake and inspection.expects_real and not opts.allow_fake:
            refused.append(f"{artifact.name}: a fake {label} dump (TCG only) where libvirt expects real hardware "
                           "(--allow-fake to publish it anyway)")
        elif build and not opts.allow_distro_build:
            refused.append(f"{artifact.name}: not a QEMU release build upstream takes: {build} "
                           f"({upstream.FLAG} to publish it anyway)")
        else:
            found.chosen.append((job, artifact, inspection))
    if refused and opts.strict:
        raise PublishError(f"run {run.id}: refusing to publish (--strict): " + "; ".join(refused))
    found.skipped += refused
    for skip in found.skipped:
        say(f"skipped: {skip}")
    if not found.chosen:
        raise PublishError(f"run {run.id} has no dump to publish ({'; '.join(found.skipped) or 'no jobs'})")
    return found


def _identity(git: Git, opts: Options) -> tuple[str, str]:
    name = opts.git_name or git.config("user.name")
    email = opts.git_email or git.config("user.email")
    if not name or not email:
        raise PublishError("no commit identity for Signed-off-by: set FARM_GIT_NAME and FARM_GIT_EMAIL "
                           "(or git config user.name / user.email in the checkout)")
    return name, email


def _check_checkout(git: Git, opts: Options) -> None:
    if not opts.checkout.is_dir():
        raise UsageError(f"{opts.checkout}: no such directory (the libvirt checkout: --libvirt or FARM_LIBVIRT_CHECKOUT)")
    if not git.is_repository():
        raise PublishError(f"{opts.checkout} is not a git checkout")
    if not (opts.checkout / CAPS_DIR).is_dir():
        raise PublishError(f"{opts.checkout} is not a libvirt tree: it has no {CAPS_DIR}")
    dirty = git.status()
    if dirty:
        shown = ", ".join(line[3:] for line in dirty[:5]) + (", ..." if len(dirty) > 5 else "")
        raise PublishError(f"{opts.checkout} has uncommitted changes ({shown}): commit, stash or clean them first")
    for remote in [opts.upstream_remote] + ([opts.fork_remote] if opts.mr else []):
        if git.remote_url(remote) is None:
            raise PublishError(f"{opts.checkout} has no remote {remote!r} (git remote add {remote} URL)")


def branch_name(qemu: str, day: datetime.date) -> str:
    """qemucaps/qemu-9.1.0-20250102: one branch per QEMU release and day."""
    return f"qemucaps/qemu-{qemu}-{day:%Y%m%d}"


# ----------------------------------------------------------------------------------- placing


def _place(job: JobRecord, artifact: Path, tree: Path, inspection: Inspection | None = None) -> Placed:
    data = tree / CAPS_DIR
    scheme = detect_scheme(data)
    name = DumpName.parse(artifact.name).with_scheme(scheme)
    target = place(data, name)
    new = dumps.load(artifact)
    layout = dumps.Layout.current if scheme is Scheme.current else dumps.Layout.old
    text = dumps.render(new.exchanges, layout)
    rendered = dumps.parse(text, str(target))
    arch = column(name.arch.value, name.variant)
    version = str(name.version)
    provenance = job.provenance or {}
    if target.exists():
        change = diff(dumps.load(target), rendered)
        action = "unchanged" if change.empty else "Update"
        return Placed(job.id, arch, version, artifact, target, action, text, change, target.name, provenance,
                      inspection)
    previous = _previous(data, name)
    against = diff(dumps.load(previous), rendered) if previous else None
    return Placed(job.id, arch, version, artifact, target, "Add", text, against,
                  previous.name if previous else None, provenance, inspection)


def _previous(data: Path, name: DumpName) -> Path | None:
    """The newest dump of the same arch and variant older than name's version."""
    older = []
    for path in data.glob("caps_*.replies"):
        try:
            other = DumpName.parse(path.name)
        except UsageError:
            continue
        if (other.arch, other.variant) == (name.arch, name.variant) and other.version < name.version:
            older.append((other.version, path))
    return max(older)[1] if older else None


# ----------------------------------------------------------------------------------- publish


def publish(ledger: Ledger, run_id: int, opts: Options, progress: Progress | None = None) -> Publication:
    """Publish run_id's dumps (see the module's description); the outcome is recorded in the ledger."""
    say = progress or (lambda message: None)
    run = ledger.run(run_id)
    opts.checkout = Path(opts.checkout).absolute()
    found = _candidates(run, opts, say)
    token = None
    if opts.mr:
        if not opts.gitlab_project and opts.mr_method == "api":
            raise PublishError("--mr needs a GitLab project: set FARM_GITLAB_PROJECT")
        if opts.mr_method == "api":
            if opts.token is None:
                raise PublishError("--mr needs a GitLab token: set FARM_GITLAB_TOKEN_FILE (or FARM_GITLAB_TOKEN)")
            token = opts.token()
    git = Git(opts.checkout, secrets=[token] if token else [])
    _check_checkout(git, opts)
    name, email = _identity(git, opts)
    git = Git(opts.checkout, name, email, git.secrets)

    say(f"fetching {opts.upstream_remote}")
    try:
        git.run("fetch", "--quiet", opts.upstream_remote, what=f"fetching {opts.upstream_remote}")
    except GitError as e:
        raise PublishFailed(f"cannot fetch the upstream remote {opts.upstream_remote!r}: {e}") from None
    target = opts.upstream_branch or git.remote_default_branch(opts.upstream_remote) or "master"
    base_ref = f"refs/remotes/{opts.upstream_remote}/{target}"
    if not git.ok("rev-parse", "--verify", "--quiet", base_ref):
        raise PublishError(f"{opts.upstream_remote} has no branch {target!r} (set FARM_UPSTREAM_BRANCH)")
    base = git.out("rev-parse", base_ref)
    branch = branch_name(run.qemu, opts.today or datetime.date.today())
    if git.branch_exists(branch):
        raise PublishError(f"branch {branch} already exists in {opts.checkout}: delete it "
                           f"(git branch -D {branch}) or publish another day")

    publication = Publication(run.id, "published", opts.checkout, branch, base, skipped=found.skipped,
                              warnings=found.warnings)
    original = git.current_branch() or git.head()
    created = False
    try:
        git.run("checkout", "--quiet", "--no-track", "-b", branch, base, what=f"creating branch {branch}")
        created = True
        placed = [_place(job, artifact, opts.checkout, inspection) for job, artifact, inspection in found.chosen]
        publication.dumps = placed
        changed = [p for p in placed if p.action != "unchanged"]
        for p in placed:
            if p.action == "unchanged":
                say(f"{p.target.name}: no semantic change, not published")
        if opts.dry_run:
            publication.status = "dry-run"
            if not changed:
                publication.branch = None
        elif not changed:
            publication.status, publication.branch = "unchanged", None
        else:
            for p in changed:
                _commit_one(git, p, opts, say)
            _deliver(git, publication, changed, run.qemu, target, opts, token, say)
    except BaseException:
        _restore(git, original, branch if created else None)
        raise
    if publication.status != "published":
        _restore(git, original, branch)
    else:
        _back_to(git, original)
    if opts.dry_run:
        return publication
    publication.record = ledger.add_publication(
        run.id, publication.status, checkout=str(opts.checkout), branch=publication.branch,
        base=base, commits=publication.commits, mr_url=publication.mr_url,
        patches=[str(p) for p in publication.patches],
        details={"dumps": [d.to_json() | {"diff": d.diff.to_json() if d.diff else None} for d in publication.dumps],
                 "skipped": found.skipped, "warnings": found.warnings, "mr_action": publication.mr_action,
                 "dry_run": opts.dry_run},
    )
    return publication


def _commit_one(git: Git, p: Placed, opts: Options, say: Progress) -> None:
    say(f"{p.target.name}: {p.action.lower()}, regenerating the tests' outputs")
    p.target.write_text(p.text, encoding="utf-8")
    try:
        libvirt_tree.regenerate_and_verify(opts.checkout, opts.build_dir, opts.tests, progress=None)
    except libvirt_tree.TestsFailed as e:
        raise PublishError(f"{p.target.name}: {e}") from None
    git.run("add", "--all", "--", ".", what="staging the new test data")
    with tempfile.NamedTemporaryFile("w", prefix="farm-commit-", suffix=".txt", encoding="utf-8") as message:
        message.write(messages.commit_message(p))
        message.flush()
        git.run("commit", "--quiet", "--no-verify", "--signoff", "-F", message.name,
                what=f"committing {p.target.name}")
    p.commit = git.head()
    say(f"{p.target.name}: committed {p.commit[:12]}: {p.subject}")


def _deliver(git: Git, publication: Publication, changed: list[Placed], qemu: str, target: str,
             opts: Options, token: str | None, say: Progress) -> None:
    assert publication.branch and publication.base
    if opts.patches is not None:
        publication.patches = write_patches(git, publication.base, opts.patches, changed, publication.run, qemu,
                                            publication.warnings)
        say(f"{len(publication.patches)} patch file(s) in {opts.patches}")
    if opts.mr:
        title = messages.title(changed, qemu)
        options = merge_requests.push_options(target, title) if opts.mr_method == "push-options" else None
        say(f"pushing {publication.branch} to {opts.fork_remote}")
        try:
            merge_requests.push(git, opts.fork_remote, publication.branch, options)
        except GitError as e:
            raise PublishFailed(f"cannot push to the fork remote {opts.fork_remote!r}: {e}") from None
        if options is not None:
            publication.mr_action = "pushed"
            return
        assert token is not None and opts.gitlab_project
        mr = merge_requests.open_or_update(opts.gitlab_url, opts.gitlab_project, token, publication.branch,
                                           target, title,
                                           messages.description(changed, publication.run, publication.warnings))
        publication.mr_url, publication.mr_action = mr.url, mr.action
        say(f"merge request {mr.action}: {mr.url}")


def write_patches(git: Git, base: str, directory: Path, placed: list[Placed], run: int, qemu: str,
                  warnings: list[str] | None = None) -> list[Path]:
    """`git format-patch --cover-letter` of base..HEAD into directory, the cover letter filled in."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    stale = sorted(directory.glob("*.patch"))
    if stale:
        raise PublishError(f"{directory} already holds patches ({stale[0].name}, ...): use an empty directory")
    out = git.out("format-patch", "--cover-letter", "--thread", "-o", str(directory), f"{base}..HEAD",
                  what="git format-patch")
    paths = [Path(line) for line in out.splitlines() if line.strip()]
    cover = paths[0]
    text = cover.read_text(encoding="utf-8")
    subject = messages.title(placed, qemu)
    if len(placed) == 1:
        subject = f"qemucapabilitiesdata: test data for qemu-{qemu}"
    text = text.replace("*** SUBJECT HERE ***", subject.removeprefix("qemucapabilitiesdata: ")
                        if len(placed) > 1 else subject)
    text = text.replace("*** BLURB HERE ***", messages.cover_blurb(placed, run, warnings))
    cover.write_text(text, encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------------- restore


def _back_to(git: Git, original: str) -> None:
    git.run("checkout", "--quiet", original, what=f"returning to {original}")


def _restore(git: Git, original: str, branch: str | None) -> None:
    """Undo: the branch's changes dropped, the original branch checked out, the branch deleted."""
    if branch is not None and git.current_branch() == branch:
        git.run("reset", "--quiet", "--hard", check=False)
        git.run("clean", "-fdq", check=False)  # not -x: ignored files (a user's build dirs) stay
    git.run("checkout", "--quiet", "--force", original, check=False)
    if branch is not None:
        git.run("branch", "-D", branch, check=False)


def options_from_settings(settings, checkout: Path | None = None, **cli) -> Options:
    """Options from farm's Settings (FARM_*), overridden by command-line values that are not None."""
    checkout = checkout or settings.libvirt_checkout
    if checkout is None:
        raise UsageError("no libvirt checkout: --libvirt PATH or FARM_LIBVIRT_CHECKOUT")
    build_dir = settings.libvirt_build_dir or settings.cache_dir / "build" / "libvirt-publish"
    return Options(
        checkout=Path(checkout), build_dir=Path(build_dir), upstream_remote=settings.upstream_remote,
        upstream_branch=settings.upstream_branch, fork_remote=settings.fork_remote, mr_method=settings.mr_method,
        git_name=settings.git_name, git_email=settings.git_email, gitlab_url=settings.gitlab_url,
        gitlab_project=settings.gitlab_project, token=settings.token,
        **{k: v for k, v in cli.items() if v is not None},
    )


def run_tests_names(text: str | None) -> list[str] | None:
    """`--tests a,b` as a list (None: every capability test the tree has)."""
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if not re.fullmatch(r"\w+", n):
            raise UsageError(f"--tests: bad test name {n!r}")
    return names
