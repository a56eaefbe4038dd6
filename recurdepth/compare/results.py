"""The sweep's results table, read and checked before anything is fitted or written.

RESULTS is a JSONL file (or a directory holding `results.jsonl`): one JSON object per finished run, written by
the sweep runner. Keys (types as checked here): variant (str), family (str: the group --baseline/--candidate
name), seed (int), rung (int, 0 = the smallest compute rung), budget_flops, config_hash, tokenizer (str),
dataset (str), unique_params, effective_params, params_once, params_rec (int), depth (mean recurrence r; 1
for dense), backprop_depth, tokens, model_flops, hardware_flops (recompute included), wall_seconds,
peak_memory_bytes, final_val_loss, best_val_loss, accuracy ({test-depth name: fraction in [0, 1]}).
`REQUIRED` must be in every row; the rest are optional and a matching that needs a missing one is skipped with
a note. Lines are numbered from 1; blank lines are skipped. Every refusal is one `DataError` line naming the
line and key, so a broken sweep is fixed at its source.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from recurdepth.errors import DataError

RESULTS_NAME = "results.jsonl"
REQUIRED = ("family", "seed", "tokens", "model_flops", "final_val_loss", "tokenizer", "dataset")
STRINGS = ("family", "tokenizer", "dataset", "variant", "config_hash")
INTEGERS = ("seed", "rung")
POSITIVE = ("tokens", "model_flops", "final_val_loss", "hardware_flops", "wall_seconds", "params_once", "depth",
            "budget_flops", "best_val_loss", "unique_params", "effective_params")
NON_NEGATIVE = ("params_rec", "peak_memory_bytes", "backprop_depth")


@dataclass(frozen=True)
class Results:
    """The checked rows of one results file: `rows[i]` came from line `lines[i]` of `path`."""

    path: Path
    rows: list
    lines: list

    @property
    def families(self) -> list:
        return sorted({row["family"] for row in self.rows})

    def family(self, name: str) -> list:
        return [row for row in self.rows if row["family"] == name]


def resolve_results_path(path) -> Path:
    """RESULTS as given: a file, or a directory holding results.jsonl; one error line when neither exists."""
    path = Path(path)
    if path.is_dir():
        inner = path / RESULTS_NAME
        if not inner.is_file():
            raise DataError(f"{path} is a directory without {RESULTS_NAME}; give the sweep's results file or its "
                            f"directory")
        return inner
    if not path.exists():
        raise DataError(f"results file {path} not found; give the sweep's {RESULTS_NAME} or its directory")
    return path


def read_results(path) -> Results:
    """Read and check RESULTS (see the module docstring): every row a JSON object with the REQUIRED keys and
    values of the right types, at least one row, one tokenizer and one dataset throughout."""
    path = resolve_results_path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read results file {path}: {exc.strerror if isinstance(exc, OSError) else exc}")
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not JSON ({exc.msg}); one JSON object per line")
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is a JSON {type(row).__name__}, not an object")
        check_row(row, f"{path} line {number}")
        rows.append(row)
        lines.append(number)
    if not rows:
        raise DataError(f"results file {path} has no runs")
    for key in ("tokenizer", "dataset"):
        first = rows[0][key]
        for row, number in zip(rows, lines):
            if row[key] != first:
                raise DataError(f"{path} mixes {key}s {first!r} (line {lines[0]}) and {row[key]!r} (line {number});"
                                f" compare runs of one {key}, in one results file each")
    return Results(path, rows, lines)


def check_row(row: dict, where: str) -> None:
    """One run's keys and value types, or one error line naming `where` and the key."""
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r} (every run needs {', '.join(REQUIRED)})")
    for key in STRINGS:
        if key in row and not isinstance(row[key], str):
            raise DataError(f"{where}: {key}={row[key]!r} is not a string")
    for key in INTEGERS:
        if key in row and (isinstance(row[key], bool) or not isinstance(row[key], int)):
            raise DataError(f"{where}: {key}={row[key]!r} is not an integer")
    for key in POSITIVE + NON_NEGATIVE:
        if key not in row or row[key] is None:
            continue
        value = row[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (key in POSITIVE and value == 0):
            bound = "> 0" if key in POSITIVE else ">= 0"
            raise DataError(f"{where}: {key}={value!r} is not a finite number {bound}")
    accuracy = row.get("accuracy")
    if accuracy is not None:
        if not isinstance(accuracy, dict):
            raise DataError(f"{where}: accuracy={accuracy!r} is not an object of test-depth name -> fraction")
        for name, value in accuracy.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise DataError(f"{where}: accuracy[{name!r}]={value!r} is not a fraction in [0, 1]")


def check_families(results: Results, baseline: str, candidate: str) -> None:
    """Both names are families of the results, and different."""
    present = ", ".join(results.families)
    for flag, name in (("--baseline", baseline), ("--candidate", candidate)):
        if name not in results.families:
            raise DataError(f"{flag} {name!r} is not a family in {results.path}; families present: {present}")
    if baseline == candidate:
        raise DataError(f"--baseline and --candidate are both {baseline!r}; name two families of {present}")
