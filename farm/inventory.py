"""The inventory: which hosts the farm probes on, and how to reach and equip them.

An inventory is a YAML file (see the commented example ``inventory.yaml`` at the
top of the repository) with optional ``defaults`` and a list of ``hosts``.
``load_inventory`` turns every mistake in it into a one-line ``UsageError``
naming the file, line, host and field.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from farm.caps import textfile
from farm.caps.arch import Architecture
from farm.caps.names import parse_variant
from farm.errors import UsageError

LIBVIRT_GIT = "https://gitlab.com/libvirt/libvirt.git"
DEFAULT_LIBVIRT = f"git:{LIBVIRT_GIT}@master"
DEFAULT_INVENTORY = "inventories/local.yaml"  # inside the farm package
MAX_BYTES = 4 * 2**20  # an inventory file; a farm of a thousand hosts is about 300 KiB
MAX_DEPTH = 32  # YAML nesting; an inventory nests 5 levels
MAX_NODES = 200_000  # YAML values, aliases expanded

HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_DEBIAN_VERSION = re.compile(r"[0-9][A-Za-z0-9.+~:-]*")
_GIT_REF = re.compile(r"[A-Za-z0-9._/+-]+")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}\$?")
_PROGRAM = re.compile(r"[A-Za-z0-9_./+][A-Za-z0-9_./+-]*")


class _At(ValueError):
    """A validation error about a field below the model that raised it."""

    def __init__(self, loc: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.loc = loc


def _value_error(call, *args):
    """Run a farm parser, turning its UsageError into the ValueError pydantic reports."""
    try:
        return call(*args)
    except UsageError as e:
        raise ValueError(str(e)) from None


def _local_path(value: Any, info: ValidationInfo) -> Any:
    """A path on this machine: ``~`` expanded, relative to the inventory file's directory."""
    if value is None or value == "":
        return None
    path = Path(os.path.expanduser(str(value)))
    base = (info.context or {}).get("base")
    return path if path.is_absolute() or base is None else base / path


def git_ref_problem(ref: str) -> str | None:
    """What is wrong with ``ref`` as the git ref or commit of a source; None when nothing is."""
    if not ref:
        return "empty"
    if ref.startswith("-"):
        return "starts with '-'"
    if any(c.isspace() or not c.isprintable() for c in ref):
        return "has whitespace or control characters"
    if not _GIT_REF.fullmatch(ref):
        return "not a branch, tag or commit (letters, digits and . _ / + - only)"
    return None


class Source(NamedTuple):
    """A parsed toolchain source, e.g. ``git:URL@REF`` -> ("git", URL, REF)."""

    kind: str
    location: str = ""  # a URL, a path or a Debian version
    ref: str = ""  # git only


def _parse_source(text: str, kinds: tuple[str, ...]) -> Source:
    kind, _, rest = text.partition(":")
    if kind not in kinds:
        raise ValueError(f"bad source {text!r}: expected one of {', '.join(k + ':...' if k != 'system' else k for k in kinds)}")
    if kind == "system":
        if rest:
            raise ValueError(f"bad source {text!r}: 'system' takes no argument")
        return Source(kind)
    if kind == "git":
        url, at, ref = rest.rpartition("@")
        if not at or not url or git_ref_problem(ref) or any(c.isspace() or not c.isprintable() for c in url):
            raise ValueError(f"bad source {text!r}: expected git:URL@REF, e.g. git:{LIBVIRT_GIT}@master")
        if url.startswith("-"):  # handed to git: never an option
            raise ValueError(f"bad source {text!r}: the git URL starts with '-'")
        return Source(kind, url, ref)
    if kind == "debian":
        if not _DEBIAN_VERSION.fullmatch(rest):
            raise ValueError(f"bad source {text!r}: expected debian:VERSION, e.g. debian:11.3.0-3+deb13u3")
        return Source(kind, rest)
    where = "on the coordinator, staged on the host by farm" if kind == "tarball" else "on the host"
    if not rest.startswith("/") or any(not c.isprintable() for c in rest):
        raise ValueError(f"bad source {text!r}: expected {kind}:/absolute/path ({where})")
    return Source(kind, rest)


LIBVIRT_KINDS = ("debian", "git", "tarball", "builddir")
QEMU_KINDS = ("system", "binary", "tarball", "git")


def network_endpoint(source: Source) -> str | None:
    """Where the host fetches this source from over the network: ``HOST:PORT`` of a git URL,
    ``apt`` (the hosts of apt's deb-src entries) for ``debian:``; None when it needs no network
    (a path on the host, a tarball farm stages, the system QEMU)."""
    if source.kind == "debian":
        return "apt"
    if source.kind != "git" or source.location.startswith(("/", "file://")):
        return None
    url = source.location
    scheme, sep, rest = url.partition("://")
    if not sep:  # scp-like user@host:path
        host = url.split(":", 1)[0].rsplit("@", 1)[-1]
        return f"{host}:22"
    authority = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    port = {"https": 443, "http": 80, "ssh": 22, "git": 9418}.get(scheme.lower(), 443)
    if authority.startswith("["):  # [v6]:port
        host, _, tail = authority[1:].partition("]")
        return f"{host}:{tail.lstrip(':') or port}"
    host, colon, explicit = authority.partition(":")
    return f"{host}:{explicit if colon and explicit.isdigit() else port}"


class Toolchain(BaseModel):
    """Where a host gets the libvirt probe (qemucapsprobe) and the QEMU it probes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    libvirt: str = Field(
        DEFAULT_LIBVIRT, description="debian:VERSION, git:URL@REF (git:/PATH.bundle@REF: a git bundle on the "
        "coordinator, staged on the host), tarball:PATH (on the coordinator, staged on the host) or builddir:PATH "
        "(an existing libvirt build on the host)"
    )
    qemu: str = Field("system", description="system, binary:PATH, tarball:PATH (on the coordinator, staged on the "
                      "host) or git:URL@REF")
    cache_dir: str | None = Field(
        None,
        description="build and source cache directory on the host (default: ~/.cache/farm; "
        "for local hosts the coordinator's FARM_CACHE_DIR)",
    )

    @field_validator("libvirt")
    @classmethod
    def _libvirt(cls, value: str) -> str:
        _parse_source(value, LIBVIRT_KINDS)
        return value

    @field_validator("qemu")
    @classmethod
    def _qemu(cls, value: str) -> str:
        _parse_source(value, QEMU_KINDS)
        return value

    @property
    def libvirt_source(self) -> Source:
        return _parse_source(self.libvirt, LIBVIRT_KINDS)

    @property
    def qemu_source(self) -> Source:
        return _parse_source(self.qemu, QEMU_KINDS)

    def network(self) -> dict[str, str]:
        """The sources of this toolchain the host fetches over the network: {"libvirt"|"qemu": endpoint}."""
        found = {"libvirt": network_endpoint(self.libvirt_source), "qemu": network_endpoint(self.qemu_source)}
        return {what: endpoint for what, endpoint in found.items() if endpoint}

    @property
    def qemu_from_git(self) -> bool:
        """Does this host build QEMU from git (and so can build any ref, not just a release's tag)?"""
        return self.qemu_source.kind == "git"


def parse_host_key(text: str) -> str:
    """Check an OpenSSH public key line ("TYPE BASE64 [comment]"); return "TYPE BASE64"."""
    parts = text.split()
    if len(parts) < 2 or parts[0] not in HOST_KEY_TYPES:
        raise ValueError(f"bad host key: expected 'TYPE BASE64', TYPE one of {', '.join(HOST_KEY_TYPES)}")
    kind, b64 = parts[:2]
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"bad host key: {kind} key is not valid base64") from None
    size = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + size] != kind.encode() or (kind == "ssh-ed25519" and len(blob) != 51):
        raise ValueError(f"bad host key: the base64 part is not an {kind} public key")
    return f"{kind} {b64}"


class Host(BaseModel):
    """One machine that runs probes: how to reach it and what it can produce."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="unique name, [A-Za-z0-9][A-Za-z0-9._-]*")
    arch: Architecture = Field(description="the arch of the dumps this host makes (libvirt's name)")
    transport: Literal["ssh", "local"] = Field("ssh", description="ssh, or local for this machine")
    address: str | None = Field(None, description="hostname or IP address (ssh)")
    port: int = Field(22, ge=1, le=65535, strict=True, description="SSH port (an integer, 1-65535)")
    user: str | None = Field(
        None,
        description="the user the agent runs as: SSH user (default farm); for local hosts "
        "the user running farm unless set (then farm runs the agent with runuser, as root)",
    )
    host_key: str | None = Field(None, description="pinned SSH host public key, 'ssh-ed25519 AAAA...'")
    known_hosts: Path | None = Field(None, description="known_hosts file to check the host key against instead")
    identity_file: Path | None = Field(None, description="SSH private key (default: the SSH agent / ~/.ssh)")
    variants: list[str] = Field([], description="variants it can produce besides the plain dump, e.g. amdsev")
    max_jobs: int = Field(1, ge=1, strict=True, description="probes run at once on this host")
    toolchain: Toolchain = Field(Toolchain(), description="libvirt and QEMU sources, cache dir")
    tags: list[str] = Field([], description="free-form labels, e.g. for selecting hosts")
    agent_python: str = Field("python3", description="Python (>= 3.9) that runs the agent on the host")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"bad host name {value!r}: letters, digits, '.', '_', '-', not starting with a symbol")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is not None and not _USER.fullmatch(value):
            raise ValueError(f"bad user name {value!r}: letters, digits, '.', '_', '-', not starting with '-' or '.'")
        return value

    @field_validator("agent_python")
    @classmethod
    def _agent_python(cls, value: str) -> str:
        if not _PROGRAM.fullmatch(value):
            raise ValueError(f"bad program {value!r}: a command name or path, no spaces, not starting with '-'")
        return value

    @field_validator("arch", mode="before")
    @classmethod
    def _arch(cls, value: Any) -> Any:
        return _value_error(Architecture.parse, value) if isinstance(value, str) else value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value.strip("[]")))
        except ValueError:
            pass
        if not _HOSTNAME.fullmatch(value) or len(value) > 253:
            raise ValueError(f"bad address {value!r}: expected a hostname or an IP address")
        return value

    @field_validator("host_key")
    @classmethod
    def _host_key(cls, value: str | None) -> str | None:
        return None if value is None else parse_host_key(value)

    _paths = field_validator("known_hosts", "identity_file", mode="before")(_local_path)

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: list[str]) -> list[str]:
        for i, variant in enumerate(value):
            try:
                if not parse_variant(variant):
                    raise _At((i,), "empty variant name")
            except UsageError as e:
                raise _At((i,), str(e)) from None
            if variant in value[:i]:
                raise _At((i,), f"variant {variant!r} listed twice")
        return value

    @model_validator(mode="after")
    def _reachable(self) -> Host:
        if self.transport == "ssh":
            if self.address is None:
                raise _At(("address",), "required for transport 'ssh'")
            if self.host_key is None and self.known_hosts is None:
                raise _At(
                    ("host_key",),
                    "required for transport 'ssh' (pin it: ssh-keyscan -t ed25519 ADDRESS), "
                    "unless defaults.known_hosts names a known_hosts file",
                )
            if self.user is None:
                object.__setattr__(self, "user", "farm")
        return self

    def produces(self, arch: Architecture, variant: str | None = None) -> bool:
        """Can this host make the dump of ``arch`` (+ ``variant``)?"""
        return self.arch == arch and (variant is None or variant in self.variants)


class Defaults(BaseModel):
    """Values for every host that does not set them; ``toolchain`` is merged key by key."""

    model_config = ConfigDict(extra="forbid")

    user: str | None = None
    port: int | None = Field(None, ge=1, le=65535, strict=True)
    known_hosts: Path | None = None
    identity_file: Path | None = None
    agent_python: str | None = None
    toolchain: Toolchain | None = None

    _paths = field_validator("known_hosts", "identity_file", mode="before")(_local_path)


class Inventory(BaseModel):
    """The hosts of a farm."""

    model_config = ConfigDict(extra="forbid")

    defaults: Defaults = Defaults()
    hosts: list[Host]
    _source: str | None = PrivateAttr(None)

    @property
    def source(self) -> str | None:
        """Where it was loaded from: a file name, or the built-in default's."""
        return self._source

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("defaults"), dict):
            return data
        defaults = {k: v for k, v in data["defaults"].items() if v is not None}
        hosts = data.get("hosts")
        if isinstance(hosts, list):
            hosts = [_merge(defaults, h) if isinstance(h, dict) else h for h in hosts]
        return {**data, "hosts": hosts}

    @field_validator("hosts")
    @classmethod
    def _unique(cls, hosts: list[Host]) -> list[Host]:
        if not hosts:
            raise ValueError("no hosts: list at least one")
        seen: dict[str, int] = {}
        for i, host in enumerate(hosts):
            if host.name in seen:
                first = seen[host.name]
                raise _At((i, "name"), f"duplicate name: hosts #{first + 1} and #{i + 1} are both named {host.name!r}")
            seen[host.name] = i
        return hosts

    def archs(self) -> list[Architecture]:
        """The archs of the hosts, in inventory order, each once."""
        return list(dict.fromkeys(h.arch for h in self.hosts))

    def hosts_for(self, arch: Architecture, variant: str | None = None) -> list[Host]:
        """Hosts that can make the dump of ``arch`` (+ ``variant``), in inventory order."""
        return [h for h in self.hosts if h.produces(arch, variant)]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise UsageError(f"no host {name!r} in the inventory (hosts: {', '.join(h.name for h in self.hosts)})")


def _merge(defaults: dict[str, Any], host: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **host}
    if isinstance(defaults.get("toolchain"), dict) and isinstance(host.get("toolchain"), dict):
        merged["toolchain"] = {**defaults["toolchain"], **host["toolchain"]}
    return merged


# -- loading ---------------------------------------------------------------------------------


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and check an inventory file; every problem is a one-line UsageError."""
    path = Path(path)
    text = textfile.read(path, MAX_BYTES, "inventory file")
    return parse_inventory(text, str(path), base=path.parent)


def parse_inventory(text: str, source: str, base: Path | None = None) -> Inventory:
    """Check the YAML ``text`` of an inventory; ``source`` names it in error messages."""
    try:
        _check_shape(text, source)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            _check_duplicate_keys(node, source)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise UsageError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:  # e.g. a reader error: a NUL byte, a control character
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        if isinstance(e, yaml.reader.ReaderError):
            where = f"{source}:{text.count(chr(10), 0, e.position) + 1}"
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
        raise UsageError(f"{where}: YAML error: {' '.join(str(problem).split())}") from None
    if data is None:
        raise UsageError(f"{source}: empty inventory: expected a mapping with a 'hosts:' list")
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping with a 'hosts:' list at the top, not a {_kind(data)}")
    try:
        inventory = Inventory.model_validate(data, context={"base": base})
    except ValidationError as e:
        # a typo shows as an unknown field and a missing one: name the typo
        first = min(e.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise UsageError(_describe(first, data, node, source)) from None
    inventory._source = source
    return inventory


def default_inventory() -> Inventory:
    """The built-in inventory: ``local`` hosts on this machine, one per arch."""
    text = resources.files("farm").joinpath(DEFAULT_INVENTORY).read_text(encoding="utf-8")
    return parse_inventory(text, f"farm/{DEFAULT_INVENTORY} (built-in)")


def resolve_inventory(path: str | os.PathLike[str] | None = None) -> Inventory:
    """The inventory to use: ``path``, else ``$FARM_INVENTORY``, else the built-in default."""
    path = path or os.environ.get("FARM_INVENTORY")
    return load_inventory(path) if path else default_inventory()


def _check_shape(text: str, source: str) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH or expanding (through aliases) to more than
    MAX_NODES nodes, from the parser's events (no recursion, nothing built): an alias bomb or
    a nesting thousands deep is a one-line error at once, not minutes or a RecursionError."""
    sizes: dict[str, int] = {}  # anchor -> nodes of its value, aliases expanded
    open_: list[tuple[str | None, int]] = []  # (anchor, nodes before it) of the collections open
    nodes = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            nodes += sizes.get(event.anchor or "", 1)  # an unknown anchor: the composer says so
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_.append((event.anchor, nodes))
            nodes += 1
            if len(open_) > MAX_DEPTH:
                raise UsageError(f"{source}:{event.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent) and open_:
            anchor, before = open_.pop()
            if anchor:
                sizes[anchor] = nodes - before
        if nodes > MAX_NODES:
            raise UsageError(f"{source}:{event.start_mark.line + 1}: more than {MAX_NODES} values once its aliases "
                             "are expanded (an alias bomb?)")


def _check_duplicate_keys(node: yaml.Node | None, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise UsageError(f"{source}:{key.start_mark.line + 1}: key {key.value!r} given twice")
                seen.add(key.value)
            _check_duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, source)


def _line(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """The line of the deepest YAML node on the path ``loc`` (1-based)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value if k.value == part), None)
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _describe(error: ErrorDetails, data: dict[str, Any], node: yaml.Node | None, source: str) -> str:
    """One line for a pydantic error: file:line: host 'name': field 'f': problem."""
    loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _At):
        loc += cause.loc
    parts = []
    fields = loc
    if loc[:1] == ("hosts",) and len(loc) > 1 and isinstance(loc[1], int):
        raw = data["hosts"][loc[1]] if loc[1] < len(data["hosts"]) else None
        name = raw.get("name") if isinstance(raw, dict) else None
        parts.append(f"host {name!r}" if isinstance(name, str) and name else f"host #{loc[1] + 1}")
        fields = loc[2:]
    elif loc[:1] == ("defaults",):
        parts.append("defaults")
        fields = loc[1:]
    if fields:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in fields).lstrip(".")
        parts.append(f"field {field!r}")
    line = _line(node, loc)
    where = f"{source}:{line}" if line else source
    return ": ".join([where, *parts, _problem(error, cause)])


def _problem(error: ErrorDetails, cause: Exception | None) -> str:
    kind = error["type"]
    if cause is not None:
        return str(cause)
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        name = str(error["loc"][-1])
        models: dict[str, type[BaseModel]] = {"hosts": Host, "defaults": Defaults, "toolchain": Toolchain}
        model = models.get(
            next((str(p) for p in reversed(error["loc"][:-1]) if isinstance(p, str)), ""), Inventory
        )
        known = list(model.model_fields)
        close = difflib.get_close_matches(name, known, n=1)
        return "unknown field" + (f", did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})")
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping, not a {_kind(error['input'])}"
    if kind == "list_type":
        return f"expected a list, not a {_kind(error['input'])}"
    if kind == "int_type":
        return f"expected an integer, not a {_kind(error['input'])}"
    return error["msg"]


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", type(None): "null", bool: "boolean"}.get(
        type(value), type(value).__name__)
