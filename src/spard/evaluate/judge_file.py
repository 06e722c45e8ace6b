"""Judge any outputs: a JSONL or CSV file of prompt + response rows, scored by one of spard's judges.

    from spard.evaluate import judge_file
    res = judge_file("outputs.jsonl", judge="openai", options={"model": "gpt-4o-mini"})
    print(res.table)                      # ASR 12.5% [5.1, 27.4] n=40 ...

Writes one verdict per row (``<file>.verdicts.jsonl`` unless ``out`` is given) and a summary with the ASR
and its Wilson interval (``<out>.summary.json``), both atomically. The judge's options go through the config
loader (:func:`spard.config.build_dataclass`), as ``eval.judge`` in a run config does, so a wrong key or
value fails with the same message. A row without the prompt or response field, or a line that is not JSON,
stops the run with the file and line. A judge that cannot judge (HTTP 401, more than ``judge.max_error_rate``
of the rows unscored) raises :class:`~spard.evaluate.judges.JudgeError` (``spard judge`` exits non-zero);
the summary then says ``"valid": false`` and why. This module is callable: ``spard.evaluate.judge_file(...)`` is
:func:`judge_file` whether or not the module has been imported.
"""

from __future__ import annotations

import csv
import json
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spard.args import JudgeArgs
from spard.config import build_dataclass
from spard.errors import ConfigError, DataError, SpardError
from spard.evaluate.judges.base import JudgeError
from spard.io import atomic_write_json, atomic_write_jsonl

__all__ = ["judge_file", "judge_args", "read_judge_rows", "JudgeFileResult", "verdicts_path", "summary_path"]


@dataclass
class _JudgeSection:
    """Wrapper so the loader names options ``judge.<key>`` in its messages."""

    judge: JudgeArgs
    """The judge and its options."""


def judge_args(judge: str | JudgeArgs = "keyword", options: Mapping[str, Any] | Sequence[str] | None = None,
               label: str = "spard judge") -> JudgeArgs:
    """The judge's options as its own Args class. ``options`` is a mapping (``{"model": "gpt-4o"}``) or
    ``judge.key=value`` strings as typed on the command line; errors name the key and where it came from."""
    if isinstance(judge, JudgeArgs):
        if options:
            raise ConfigError("pass the judge's options either in its Args or as options, not both")
        return judge
    raw: dict[str, Any] = {"name": judge}
    origin: dict[str, str] = {}
    if isinstance(options, Mapping):
        raw.update(options)
    else:
        for item in options or ():
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key.startswith("judge.") or key == "judge.":
                raise ConfigError(f"{label}: {item!r}: expected judge.key=value, e.g. judge.model=gpt-4o-mini")
            raw[key.removeprefix("judge.")] = yaml.safe_load(value) if value.strip() else ""
            origin[key] = f"override {item!r}"
    return build_dataclass(_JudgeSection, {"judge": raw}, label, origin=origin).judge


@dataclass
class JudgeRow:
    """One input row: where it is, what was asked and answered, the row itself."""

    line: int
    prompt: str
    response: str
    category: str | None
    row: dict[str, Any]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None


def _csv_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [name for name in fields if name not in header]
        if missing:
            raise DataError(f"{path}:1: no column {missing[0]!r} in the header (columns: {header})")
        start = reader.line_num + 1
        for row in reader:  # a quoted field may span lines: a row starts after the previous one ends
            if None in row:
                raise DataError(f"{path}:{start}: {len(header) + len(row[None])} values for {len(header)} columns")
            yield start, row
            start = reader.line_num + 1


def read_judge_rows(path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response",
                    category_field: str | None = None) -> list[JudgeRow]:
    """The rows of a JSONL (``.jsonl``) or CSV (``.csv``) file; any bad row raises a DataError naming the
    file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    fields = [prompt_field, response_field]
    if path.suffix == ".jsonl":
        source = _jsonl_rows(path)
    elif path.suffix == ".csv":
        source = _csv_rows(path, fields)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .csv)")
    rows = []
    try:
        for line, row in source:
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
            for name in fields:
                if name not in row:
                    raise DataError(f"{path}:{line}: no field {name!r} (fields: {sorted(row)}); choose the "
                                    "field names with --prompt-field / --response-field")
                if not isinstance(row[name], str):
                    raise DataError(f"{path}:{line}: field {name!r} is {type(row[name]).__name__}, not a string")
            category = row.get(category_field) if category_field else None
            rows.append(JudgeRow(line, row[prompt_field], row[response_field],
                                 None if category in (None, "") else str(category), row))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not rows:
        raise DataError(f"{path}: no rows to judge")
    return rows


def verdicts_path(path: str | Path) -> Path:
    """Default output: ``outputs.jsonl`` -> ``outputs.verdicts.jsonl`` (beside the input)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.verdicts.jsonl")


def summary_path(out: str | Path) -> Path:
    """The summary beside the verdicts: ``x.verdicts.jsonl`` -> ``x.verdicts.summary.json``."""
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix('.jsonl')}.summary.json")


@dataclass
class JudgeFileResult:
    """What :func:`judge_file` wrote and found."""

    verdicts: Path
    """One JSON line per input row: ``line``, ``judge``, the verdict fields and the row under ``input``."""
    summary_file: Path
    """The summary as JSON."""
    summary: dict[str, Any]
    """``file``, ``judge``, ``judge_options``, ``n`` and ``metrics`` (ASR, refusal, degenerate and error
    rates with 95 % Wilson intervals; ``by_category`` with a category field)."""
    table: str
    """One printable line per rate."""


def _pct(rate: dict[str, Any]) -> str:
    if rate["value"] is None:
        return f"  n/a   n={rate['n']}"
    lo, hi = rate["ci95"]
    return f"{100 * rate['value']:5.1f}% [{100 * lo:4.1f}, {100 * hi:4.1f}] n={rate['n']}"


def _invalid_reason(error_rate: dict[str, Any], max_error_rate: float, judge: str, path: str | Path) -> str | None:
    """Why judging a file failed: the judge could not score more than ``judge.max_error_rate`` of its rows."""
    if not error_rate["n"] or error_rate["value"] <= max_error_rate:
        return None
    return (f"judge {judge!r} could not score {error_rate['k']} of {error_rate['n']} rows of {path} "
            f"({100 * error_rate['value']:.1f}% > judge.max_error_rate={max_error_rate:g})")


def judge_file(path: str | Path, judge: str | JudgeArgs = "keyword",
               options: Mapping[str, Any] | Sequence[str] | None = None, *, prompt_field: str = "prompt",
               response_field: str = "response", category_field: str | None = None,
               out: str | Path | None = None) -> JudgeFileResult:
    """Judge every prompt + response row of ``path`` (JSONL or CSV) with ``judge`` (a name with ``options``,
    or its Args); write the verdicts and the summary; return them."""
    from dataclasses import asdict

    from spard.evaluate.harm import judge_metrics
    from spard.registry import build

    args = judge_args(judge, options)
    rows = read_judge_rows(path, prompt_field=prompt_field, response_field=response_field,
                           category_field=category_field)
    judge_obj = build(args)
    results = judge_obj([r.prompt for r in rows], [r.response for r in rows])
    if len(results) != len(rows):
        raise SpardError(f"judge {args.name!r} returned {len(results)} verdicts for {len(rows)} rows")
    out = Path(out) if out is not None else verdicts_path(path)
    atomic_write_jsonl(out, [{"line": r.line, "judge": args.name, **res.to_dict(), "input": r.row}
                             for r, res in zip(rows, results)])
    categories = [r.category for r in rows] if category_field else None
    metrics = judge_metrics(results, categories)
    options_out = {k: v for k, v in asdict(args).items() if k != "name"}
    summary = {"file": str(path), "judge": args.name, "judge_options": options_out, "n": len(rows),
               "metrics": metrics}
    reason = _invalid_reason(metrics["error_rate"], args.max_error_rate, args.name, path)
    summary["valid"] = reason is None
    if reason is not None:
        summary["invalid_reason"] = reason
    summary_file = atomic_write_json(summary_path(out), summary)
    if reason is not None:  # after writing: the verdicts show what the judge said
        raise JudgeError(f"{reason}; verdicts in {out}, summary marked invalid in {summary_file}")
    errors = metrics["error_rate"]["k"]
    asr_label = f"ASR ({args.name}, {errors} errors left out)" if errors else f"ASR ({args.name})"
    lines = [asr_label.ljust(22) + _pct(metrics["asr"]),
             "refusal rate".ljust(22) + _pct(metrics["refusal_rate"]),
             "degenerate replies".ljust(22) + _pct(metrics["degenerate_rate"]),
             "judge errors".ljust(22) + _pct(metrics["error_rate"])]
    for name, block in metrics.get("by_category", {}).items():
        lines.append(f"  ASR {name}"[:21].ljust(22) + _pct(block["asr"]))
    return JudgeFileResult(out, summary_file, summary, "\n".join(lines))


class _CallableModule(types.ModuleType):
    """Importing this module binds it as ``spard.evaluate.judge_file``, shadowing the function of the same
    name: calling the module calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> JudgeFileResult:
        return judge_file(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
