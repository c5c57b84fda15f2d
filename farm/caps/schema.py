"""Key rules for query-qmp-schema entries, as libvirt's qemu-replies-tool.py has them.

libvirt's QMP schema code handles only these keys per meta-type; a QEMU that
adds one must be looked at before its dump is accepted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# meta-type -> (mandatory keys, optional keys, {list key: rule of its items})
Rule = tuple[dict[str, type], dict[str, type], dict[str, "Rule"]]

_FEATURES: dict[str, type] = {"features": list}

_RULES: dict[str, Rule] = {
    "command": (
        {"name": str, "meta-type": str, "arg-type": str, "ret-type": str},
        {"features": list, "allow-oob": bool},
        {},
    ),
    "event": ({"name": str, "meta-type": str, "arg-type": str}, _FEATURES, {}),
    "object": (
        {"name": str, "meta-type": str, "members": list},
        {"tag": str, "variants": list, "features": list},
        {
            "members": ({"name": str, "type": str}, {"default": type(None), "features": list}, {}),
            "variants": ({"case": str, "type": str}, {}, {}),
        },
    ),
    "array": ({"name": str, "meta-type": str, "element-type": str}, {}, {}),
    "enum": (
        {"name": str, "meta-type": str},
        {"members": list, "values": list},
        {"members": ({"name": str}, _FEATURES, {})},
    ),
    "alternate": (
        {"name": str, "meta-type": str, "members": list},
        {},
        {"members": ({"type": str}, {}, {})},
    ),
    "builtin": ({"name": str, "meta-type": str, "json-type": str}, {}, {}),
}


def check(entries: object) -> Iterator[tuple[int, str]]:
    """Yield (entry index, message) for every entry breaking the rules."""
    if not isinstance(entries, list):
        yield 0, "the schema is not a JSON array"
        return
    for index, entry in enumerate(entries):
        if type(entry) is dict and _fits(entry, _RULES.get(str(entry.get("meta-type")))):
            continue
        if not isinstance(entry, dict):
            yield index, f"entry #{index} is not a JSON object"
            continue
        rule = _RULES.get(str(entry.get("meta-type")))
        if rule is None:
            yield index, f"entry {_name(entry)}: unknown or missing 'meta-type' {entry.get('meta-type')!r}"
            continue
        for message in _check_keys(entry, rule):
            yield index, f"entry {_name(entry)} ({entry['meta-type']}): {message}"


def _fits(entry: dict[str, Any], rule: Rule | None) -> bool:
    """A fast yes for the common case; _check_keys says what is wrong."""
    if rule is None:
        return False
    mandatory, optional, items = rule
    for key, kind in mandatory.items():
        if type(entry.get(key)) is not kind:
            return False
    if len(entry) > len(mandatory):
        for key, value in entry.items():
            if key not in mandatory and type(value) is not optional.get(key):
                return False
        features = entry.get("features")
        if features:
            for f in features:
                if type(f) is not str:
                    return False
    for key, item_rule in items.items():
        values = entry.get(key)
        if values:
            for item in values:
                if type(item) is not dict or not _fits(item, item_rule):
                    return False
    return True


def _check_keys(entry: dict[str, Any], rule: Rule, where: str = "") -> Iterator[str]:
    mandatory, optional, items = rule
    for key, kind in mandatory.items():
        if key not in entry:
            yield f"{where}missing mandatory key {key!r}"
        elif not isinstance(entry[key], kind):
            yield f"{where}key {key!r} is not of type {kind.__name__}"
    for key, kind in optional.items():
        if key in entry and not isinstance(entry[key], kind):
            yield f"{where}key {key!r} is not of type {kind.__name__}"
    unknown = [k for k in entry if k not in mandatory and k not in optional]
    if unknown:
        yield f"{where}unhandled key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
    features = entry.get("features")
    if isinstance(features, list) and not all(isinstance(f, str) for f in features):
        yield f"{where}'features' holds a non-string"
    for key, item_rule in items.items():
        values = entry.get(key)
        if not isinstance(values, list):
            continue
        for i, item in enumerate(values):
            if not isinstance(item, dict):
                yield f"{where}{key}[{i}] is not a JSON object"
            else:
                yield from _check_keys(item, item_rule, f"{where}{key}[{i}] {_name(item)}: ")


def _name(entry: dict[str, Any]) -> str:
    name = entry.get("name", entry.get("case", entry.get("type")))
    return repr(name) if isinstance(name, str) else "(unnamed)"
