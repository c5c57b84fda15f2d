"""A semantic diff of two ``.replies`` dumps: what QEMU gained, lost or changed.

Each section has one small extractor turning a dump into ``{item: value}``
(value None when only presence matters, a scalar, a list compared as a set, or
a dict of attributes); one comparison turns two such maps into a ``Change``.
Feature sections describe QEMU itself; environment sections depend on the host
and accelerator the probe ran on and are reported apart.

QMP schema entries other than commands, events and builtins have masked names
("123") that change from one QEMU build to the next, so types are named by
where they are reached from a command or event, in the path syntax of libvirt's
schema queries: ``blockdev-add/arg-type/+qcow2/data-file`` (``+`` a union
variant, ``^`` an enum value, ``$`` a feature; arrays and alternates are
walked through).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.caps.dump import Dump, Exchange

Items = dict[str, object]

# --- the result --------------------------------------------------------------


@dataclass
class Change:
    """One section of the diff."""

    title: str
    added: list[str]
    removed: list[str]
    changed: list[str]

    @property
    def counts(self) -> str:
        marks = (("+", self.added), ("-", self.removed), ("~", self.changed))
        return " ".join(f"{mark}{len(items)}" for mark, items in marks if items)

    def lines(self) -> list[tuple[str, str]]:
        return [("+", i) for i in self.added] + [("-", i) for i in self.removed] + [("~", i) for i in self.changed]


@dataclass
class DumpDiff:
    old: str
    new: str
    features: list[Change]
    environment: list[Change]
    version: tuple[str, str]

    @property
    def empty(self) -> bool:
        return not self.features and not self.environment and self.version[0] == self.version[1]

    def _version(self) -> str:
        old, new = self.version
        return f"QEMU {old}" if old == new else f"QEMU {old} -> {new}"

    def to_text(self, limit: int | None = None) -> str:
        """Compact text; ``limit`` caps the items shown per section."""
        out = [f"{self.old} -> {self.new} ({self._version()})"]
        if self.empty:
            return out[0] + "\nno semantic changes\n"
        for heading, changes in (("", self.features), ("Environment (host, accelerator):", self.environment)):
            if heading and changes:
                out.append(heading)
            for change in changes:
                out.append(f"{change.title}: {change.counts}")
                lines = change.lines()
                out += [f"  {mark} {item}" for mark, item in lines[:limit]]
                if limit is not None and len(lines) > limit:
                    out.append(f"  ... and {len(lines) - limit} more")
        return "\n".join(out) + "\n"

    def to_markdown(self, fold: int = 10) -> str:
        """For merge request descriptions; lists longer than ``fold`` collapse."""
        out = [f"### `{self.old}` → `{self.new}` ({self._version()})", ""]
        if self.empty:
            return "\n".join(out + ["No semantic changes.", ""])
        sections = (("QEMU changes", self.features), ("Environment changes (host, accelerator)", self.environment))
        for heading, changes in sections:
            if not changes:
                continue
            out += [f"#### {heading}", ""]
            for change in changes:
                bullets = [f"- `{mark} {_code(item)}`" for mark, item in change.lines()]
                summary = f"<b>{change.title}</b>: {change.counts}"
                if len(bullets) > fold:
                    out += ["<details>", f"<summary>{summary}</summary>", "", *bullets, "", "</details>", ""]
                else:
                    out += [summary, "", *bullets, ""]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "new": self.new,
            "version": {"old": self.version[0], "new": self.version[1]},
            "empty": self.empty,
            "features": [dataclasses.asdict(c) for c in self.features],
            "environment": [dataclasses.asdict(c) for c in self.environment],
        }


def _code(item: str) -> str:
    """An item fit for a markdown code span."""
    return item.replace("`", "'")


# --- comparing -----------------------------------------------------------------


class Malformed(ValueError):
    """A dump whose replies are not shaped as QEMU answers (a list where QEMU sends objects, ...)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def diff(old: Dump, new: Dump) -> DumpDiff:
    """The semantic diff; a reply of a shape QEMU never sends raises Malformed."""

    def items(title: str, extract: Callable[[Dump], Items], dump: Dump) -> Items:
        try:
            return extract(dump)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise Malformed(dump.path, f"{title}: a reply QEMU would not send ({type(e).__name__}: {e})") from None

    def run(table: dict[str, Callable[[Dump], Items]]) -> list[Change]:
        changes = [_compare(title, items(title, extract, old), items(title, extract, new))
                   for title, extract in table.items()]
        return [c for c in changes if c.added or c.removed or c.changed]

    return DumpDiff(
        old=Path(old.path).name,
        new=Path(new.path).name,
        features=run(FEATURES),
        environment=run(ENVIRONMENT),
        version=(_version(old), _version(new)),
    )


class Probed(dict[Any, Any]):  # keys from the dump: usually strings
    """Items per probed thing: ``{probe: Items}``.

    libvirt's list of probes changes between libvirt releases, and a thing
    probed in only one dump says nothing about QEMU: only probes in both dumps
    are compared, their items named ``probe.item``.
    """

    def common(self, other: Probed) -> Items:
        return {f"{probe}.{k}": v for probe in self.keys() & other.keys() for k, v in self[probe].items()}


def _compare(title: str, old: Items, new: Items) -> Change:
    if isinstance(old, Probed) and isinstance(new, Probed):
        common = old.common(new), new.common(old)
        old, new = common
    changed = []
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            plus = [f"+{v}" for v in sorted(set(map(str, b)) - set(map(str, a)))]
            minus = [f"-{v}" for v in sorted(set(map(str, a)) - set(map(str, b)))]
            changed.append(f"{key}: {' '.join(plus + minus)}")
        elif isinstance(a, dict) and isinstance(b, dict):
            attrs = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            changed.append(f"{key}: " + ", ".join(f"{k} {_attr(a, k)} -> {_attr(b, k)}" for k in attrs))
        else:
            changed.append(f"{key}: {_show(a)} -> {_show(b)}")
    return Change(title, sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys()), changed)


def _show(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _attr(attrs: dict[str, Any], key: str) -> str:
    return _show(attrs[key]) if key in attrs else "(none)"


def _version(dump: Dump) -> str:
    reply = _result(dump, "query-version")
    qemu = reply.get("qemu") if isinstance(reply, dict) else None
    if not isinstance(qemu, dict) or not qemu:
        return "unknown"
    return ".".join(str(v) if isinstance(v := qemu.get(k), int) else "?" for k in ("major", "minor", "micro"))


def _result(dump: Dump, execute: str, session: int = 0) -> Any:
    ex = dump.find(execute, session)
    return ex.result if ex else None


# --- feature sections ------------------------------------------------------------


def _schema(dump: Dump) -> list[dict[str, Any]]:
    return _result(dump, "query-qmp-schema") or []


def _schema_names(meta_type: str) -> Callable[[Dump], Items]:
    return lambda dump: {e["name"]: None for e in _schema(dump) if e.get("meta-type") == meta_type}


def _schema_paths(dump: Dump) -> Items:
    """Every member, variant, enum value and feature reachable from a command or event."""
    entries = _schema(dump)
    types = {e["name"]: e for e in entries}
    out: Items = {}

    def describe(name: str) -> str:
        t = types.get(name, {})
        kind = t.get("meta-type", "unknown")
        if kind == "builtin":
            return str(t["json-type"])
        if kind == "array":
            return f"[{describe(t['element-type'])}]"
        if kind == "alternate":
            return " | ".join(sorted({describe(m["type"]) for m in t["members"]}))
        return str(kind)

    def walk(path: str, name: str, seen: frozenset[str]) -> None:
        t = types.get(name)
        if t is None or name in seen:
            return
        seen |= {name}
        for feature in t.get("features", []):
            out[f"{path}/${feature}"] = None
        kind = t["meta-type"]
        if kind == "array":
            walk(path, t["element-type"], seen)
        elif kind == "alternate":
            for m in t["members"]:
                walk(path, m["type"], seen)
        elif kind == "enum":
            for value in t.get("values") or [m["name"] for m in t.get("members", [])]:
                out[f"{path}/^{value}"] = None
        elif kind == "object":
            for m in t["members"]:
                member = f"{path}/{m['name']}"
                out[member] = describe(m["type"]) + (" (optional)" if "default" in m else "")
                for feature in m.get("features", []):
                    out[f"{member}/${feature}"] = None
                walk(member, m["type"], seen)
            for v in t.get("variants", []):
                walk(f"{path}/+{v['case']}", v["type"], seen)

    for e in entries:
        if e.get("meta-type") in ("command", "event"):
            for feature in e.get("features", []):
                out[f"{e['name']}/${feature}"] = None
            for role in ("arg-type", "ret-type"):
                if role in e:
                    out[f"{e['name']}/{role}"] = describe(e[role])
                    walk(f"{e['name']}/{role}", e[role], frozenset())
    return out


def _machines(dump: Dump) -> Items:
    return {m["name"]: {k: v for k, v in m.items() if k != "name"} for m in _result(dump, "query-machines") or []}


def _cpu_models(dump: Dump) -> Items:
    host_dependent = {"name", "unavailable-features"}
    return {
        c["name"]: {k: v for k, v in c.items() if k not in host_dependent}
        for c in _result(dump, "query-cpu-definitions") or []
    }


def _qom_types(dump: Dump) -> Items:
    return {t["name"]: t.get("parent") for t in _result(dump, "qom-list-types") or []}


def _properties(execute: str) -> Callable[[Dump], Items]:
    """Properties per probed type: ``typename.property`` -> type and default.

    An error reply (type absent) counts as no properties.
    """

    def extract(dump: Dump) -> Items:
        probes = [ex for ex in (dump.sessions or [[]])[0] if ex.execute == execute]
        return Probed(
            {
                ex.arguments.get("typename"): {
                    p["name"]: {k: v for k, v in p.items() if k in ("type", "default-value")} for p in ex.result or []
                }
                for ex in probes
            }
        )

    return extract


def _migration_capabilities(dump: Dump) -> Items:
    return {c["capability"]: None for c in _result(dump, "query-migrate-capabilities") or []}


def _command_line_options(dump: Dump) -> Items:
    out: Items = {}
    for option in _result(dump, "query-command-line-options") or []:
        out[f"-{option['option']}"] = None
        for p in option.get("parameters", []):
            out[f"-{option['option']} {p['name']}"] = p.get("type")
    return out


def _tpm(dump: Dump) -> Items:
    return {f"{kind} {name}": None for kind in ("model", "type") for name in _result(dump, f"query-tpm-{kind}s") or []}


# --- environment sections ----------------------------------------------------------


def _flat(prefix: str, value: object, out: Items) -> Items:
    """A reply flattened to ``prefix.key`` -> scalar or list."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def _replies(*executes: str) -> Callable[[Dump], Items]:
    """Whole replies of session 0, flattened; an error reply is its class."""

    def extract(dump: Dump) -> Items:
        out: Items = {}
        for execute in executes:
            ex = dump.find(execute)
            if ex is not None:
                value = ex.result if "error" not in ex.reply else f"error {ex.reply['error'].get('class')}"
                _flat(execute, value, out)
        return out

    return extract


def _unavailable_features(dump: Dump) -> Items:
    return {
        c["name"]: sorted(set(c.get("unavailable-features", []))) for c in _result(dump, "query-cpu-definitions") or []
    }


def _expansion_name(ex: Exchange) -> str:
    model = ex.arguments.get("model", {})
    props = "".join(f" {k}={_show(v)}" for k, v in sorted(model.get("props", {}).items()))
    return f"{ex.arguments.get('type')} {model.get('name')}{props}"


def _cpu_expansions(dump: Dump) -> Items:
    out: Items = {}
    for ex in dump.all("query-cpu-model-expansion"):
        if ex.result is None:
            continue
        model = ex.result.get("model", {})
        for prop, value in {"model": model.get("name"), **model.get("props", {})}.items():
            out[f"{_expansion_name(ex)}: {prop}"] = value
    return out


def _sessions(dump: Dump) -> Items:
    return {"probe sessions": len(dump.sessions)}


FEATURES: dict[str, Callable[[Dump], Items]] = {
    "QMP commands": _schema_names("command"),
    "QMP events": _schema_names("event"),
    "QMP schema": _schema_paths,
    "Machine types": _machines,
    "CPU models": _cpu_models,
    "QOM types": _qom_types,
    "Device properties": _properties("device-list-properties"),
    "Object properties": _properties("qom-list-properties"),
    "Migration capabilities": _migration_capabilities,
    "Command-line options": _command_line_options,
    "TPM": _tpm,
}

ENVIRONMENT: dict[str, Callable[[Dump], Items]] = {
    "Accelerator": _replies("query-kvm", "query-accelerators"),
    "Probe sessions": _sessions,
    "Confidential computing": _replies("query-sev-capabilities", "query-sgx-capabilities"),
    "CPU models unavailable on the host": _unavailable_features,
    "Host CPU model expansion": _cpu_expansions,
}
