"""Coverage of a libvirt checkout: QEMU version x arch x variant, each cell judged.

A file named like a dump that cannot be read as one (a directory, a FIFO, not UTF-8, too
large) is an invalid cell; the other cells are judged as usual."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from farm.caps import dump
from farm.caps.arch import Architecture
from farm.caps.inspect import Inspection, inspect, unreadable
from farm.caps.names import DumpName, Scheme, column, detect_scheme
from farm.caps.version import QemuVersion
from farm.errors import UsageError

DATA_DIR = Path("tests") / "qemucapabilitiesdata"


@dataclass
class Cell:
    version: QemuVersion
    column: str  # arch[+variant]
    inspection: Inspection

    def to_json(self) -> dict:
        i = self.inspection
        return {
            "version": str(self.version),
            "column": self.column,
            "file": Path(i.file).name,
            "verdict": i.verdict.value,
            "expects_real": i.expects_real,
            "reasons": i.reasons,
            "warnings": i.warnings,
        }


@dataclass
class Coverage:
    directory: Path
    scheme: Scheme
    cells: list[Cell]
    strays: list[str] = field(default_factory=list)  # .replies files whose names libvirt would not use

    @property
    def versions(self) -> list[QemuVersion]:
        return sorted({c.version for c in self.cells})

    @property
    def columns(self) -> list[str]:
        return sorted({c.column for c in self.cells}, key=_column_order)

    def cell(self, version: QemuVersion, column: str) -> Cell | None:
        return next((c for c in self.cells if c.version == version and c.column == column), None)

    def to_json(self) -> dict:
        return {
            "directory": str(self.directory),
            "scheme": self.scheme.value,
            "versions": [str(v) for v in self.versions],
            "columns": self.columns,
            "cells": [c.to_json() for c in self.cells],
            "strays": self.strays,
        }


def data_dir(tree: Path) -> Path:
    """tests/qemucapabilitiesdata of a libvirt checkout (or that directory itself)."""
    for candidate in (tree / DATA_DIR, tree):
        if candidate.is_dir() and any(candidate.glob("caps_*.replies")):
            return candidate
    if not tree.exists():
        raise UsageError(f"{tree}: no such directory")
    raise UsageError(f"{tree}: not a libvirt checkout (no {DATA_DIR}/caps_*.replies)")


def coverage(tree: Path) -> Coverage:
    directory = data_dir(tree)
    cells, strays = [], []
    for path in sorted(directory.glob("*.replies")):
        try:
            name = DumpName.parse(path.name)
        except UsageError as e:
            strays.append(str(e))
            continue
        try:
            inspection = inspect(dump.load(path), name)
        except UsageError as e:  # a directory, a FIFO, not UTF-8, too large: a bad cell, the rest still shown
            inspection = unreadable(str(path), name, str(e).removeprefix(f"{path}: "))
        cells.append(Cell(name.version, column(name.arch.value, name.variant), inspection))
    return Coverage(directory, detect_scheme(directory), cells, strays)


def _column_order(column: str) -> tuple[int, str]:
    arch = Architecture.parse(column.split("+")[0])
    return (list(Architecture).index(arch), column)
