"""Dense and pruned models side by side: one markdown table and PNG plots.

Rows come from result files written by ``llmprune eval --json`` (nothing is re-evaluated) or
from evaluating the given models here. What a row shows about the checkpoint itself (method,
pattern, achieved sparsity) comes from its ``llmprune.json``; a model without one is the dense
baseline. Size is that of the ``*.safetensors`` files in the model directory.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LLMPruneError
from ..report import REPORT_FILE, PruneReport
from .harness import headline

REPORT_NAME = "report.md"
PPL_PLOT = "ppl_vs_sparsity.png"
ACC_PLOT = "accuracy.png"


def result_record(model: str | os.PathLike, ppl=None, tasks: dict | None = None) -> dict:
    """The JSON that ``llmprune eval --json`` writes and :func:`read_result` reads.

    ``{"model": path, <PerplexityResult fields: dataset, ppl, nll, seqlen, windows, ...>,
    "tasks": {name: metrics}, "lm_eval": {limit, num_fewshot, seconds, ...}}``; the perplexity
    fields and the task fields are each present only when that evaluation ran.
    """
    record: dict = {"model": str(model)}
    if ppl is not None:
        record.update(ppl.to_json())
    if tasks is not None:
        record["tasks"] = tasks["tasks"]
        record["lm_eval"] = {key: value for key, value in tasks.items() if key != "tasks"}
    return record


def read_result(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LLMPruneError(f"result file {path} does not exist; write one with llmprune eval MODEL --json {path}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LLMPruneError(f"result file {path} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or "model" not in record:
        raise LLMPruneError(f"result file {path} has no \"model\" field; it was not written by llmprune eval --json")
    return record


@dataclass
class Row:
    """One model of the comparison."""

    label: str
    model: str
    source: str  # the result file, or "evaluated"
    method: str = "dense"
    pattern: str | None = None
    sparsity: float | None = 0.0
    size_bytes: int | None = None
    ppl: float | None = None
    ppl_protocol: str | None = None
    tasks: dict[str, dict] = field(default_factory=dict)
    task_limit: int | float | None = None

    def accuracy(self, task: str) -> float | None:
        entry = self.tasks.get(task)
        return None if entry is None else headline(entry)[1]


def checkpoint_facts(model: str | os.PathLike) -> dict:
    """Method, pattern, sparsity (from ``llmprune.json``) and safetensors size of a model directory."""
    path = Path(model)
    directory = path if path.is_dir() else path.parent
    facts: dict = {"size_bytes": None}
    files = sorted(directory.glob("*.safetensors")) if path.is_dir() else []
    if files:
        facts["size_bytes"] = sum(f.stat().st_size for f in files)
    if path.exists() and (directory / REPORT_FILE).is_file():
        report = PruneReport.read(directory)
        facts.update(method=report.recipe.method, pattern=report.recipe.pattern, sparsity=report.summary.sparsity)
    elif not path.exists():
        facts.update(method="?", pattern=None, sparsity=None)  # the result file names a model no longer here
    return facts


def _ppl_protocol(record: dict) -> str | None:
    if record.get("ppl") is None:
        return None
    windows, total = record.get("windows") or [], record.get("total_windows")
    used = "all windows" if len(windows) == total else f"{len(windows)} of {total} windows"
    return f"{record.get('dataset')}, seqlen {record.get('seqlen')}, {used}"


def row_from_record(record: dict, source: str, label: str | None = None) -> Row:
    model = str(record["model"])
    row = Row(label=label or _label(model), model=model, source=source, **checkpoint_facts(model))
    row.ppl = record.get("ppl")
    row.ppl_protocol = _ppl_protocol(record)
    row.tasks = dict(record.get("tasks") or {})
    row.task_limit = (record.get("lm_eval") or {}).get("limit")
    return row


def _label(model: str) -> str:
    path = Path(model)
    return (path.stem if path.suffix == ".gguf" else path.name) or model


def _unique_labels(rows: list[Row]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        count = seen.get(row.label, 0)
        seen[row.label] = count + 1
        if count:
            row.label = f"{row.label}#{count + 1}"


def evaluate_model(model: str | os.PathLike, ppl: str | None = None, tasks: list[str] | str | None = None,
                   limit: int | float | None = None, seqlen: int = 2048, window_stride: int = 1,
                   device: str = "auto", dtype: str | None = None, batch_size: int | None = None,
                   tasks_dir=None, data_dir=None, progress: bool = True) -> dict:
    """Load ``model`` and evaluate it; returns the record :func:`result_record` describes."""
    from ..loading import load
    from .harness import evaluate_tasks, resolve_tasks
    from .perplexity import perplexity

    if not ppl and not tasks:
        raise LLMPruneError(f"nothing to evaluate {model} on: give --ppl and/or --tasks")
    if tasks:
        resolve_tasks(tasks, tasks_dir)  # fail on a bad task name before loading anything
    loaded = load(model, device=device, dtype=dtype)
    ppl_result = task_result = None
    if ppl:
        ppl_result = perplexity(loaded, ppl, seqlen=seqlen, window_stride=window_stride,
                                batch_size=batch_size or 1, progress=progress)
    if tasks:
        task_result = evaluate_tasks(loaded, tasks, limit=limit, batch_size=batch_size or 16,
                                     tasks_dir=tasks_dir, data_dir=data_dir, progress=progress)
    return result_record(model, ppl_result, task_result)


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def collect_rows(models: list[str] = (), results: list[str] = (), evaluate=None) -> list[Row]:
    """Rows for ``models`` and the ``results`` files, in the given order with dense models first.

    A model with a result file among ``results`` is read from it; any other is passed to
    ``evaluate(model) -> record`` (None: an error naming the model). Result files for models not
    listed in ``models`` are added after them.
    """
    records = [(str(path), read_result(path)) for path in results]
    rows, used = [], set()
    for model in models:
        match = next((i for i, (_, rec) in enumerate(records) if i not in used and _same_model(str(rec["model"]), model)), None)
        if match is not None:
            used.add(match)
            rows.append(row_from_record(records[match][1], records[match][0]))
        elif evaluate is None:
            raise LLMPruneError(f"no result file for {model}: pass its `llmprune eval --json` file with --results, "
                                f"or --ppl/--tasks to evaluate it now")
        else:
            rows.append(row_from_record(evaluate(model), "evaluated"))
    rows += [row_from_record(rec, path) for i, (path, rec) in enumerate(records) if i not in used]
    rows.sort(key=lambda row: row.method != "dense")  # the dense baseline first, the given order otherwise
    if not rows:
        raise LLMPruneError("nothing to compare: give model paths and/or --results files")
    _unique_labels(rows)
    return rows


# ---------------------------------------------------------------------------------------- table

def task_names(rows: list[Row]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [name for name in row.tasks if name not in names]
    return names


def mean_accuracy(row: Row, tasks: list[str]) -> float | None:
    """Mean headline accuracy over ``tasks``; None when the row lacks one of them."""
    values = [row.accuracy(task) for task in tasks]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value * scale, spec)


def _ppl_text(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def markdown_table(rows: list[Row]) -> str:
    tasks = task_names(rows)
    metric = {task: next(headline(r.tasks[task])[0] for r in rows if task in r.tasks) for task in tasks}
    header = ["model", "method", "pattern", "sparsity", "ppl"] + [f"{t} ({metric[t]})" for t in tasks]
    header += ["mean acc" if tasks else None, "size (MiB)"]
    header = [h for h in header if h is not None]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row in rows:
        cells = [row.label, row.method, row.pattern or "–", _fmt(row.sparsity, ".4f"),
                 _ppl_text(row.ppl)]
        cells += [_fmt(row.accuracy(t), ".2f", 100) for t in tasks]
        if tasks:
            cells.append(_fmt(mean_accuracy(row, tasks), ".2f", 100))
        cells.append(_fmt(None if row.size_bytes is None else row.size_bytes / 2**20, ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(rows: list[Row]) -> list[str]:
    notes = []
    protocols = {row.ppl_protocol for row in rows if row.ppl_protocol}
    if len(protocols) == 1:
        notes.append(f"Perplexity: {protocols.pop()}.")
    elif protocols:
        notes.append("**Perplexity protocols differ between rows, so the figures are not comparable:** "
                     + "; ".join(f"{r.label}: {r.ppl_protocol}" for r in rows if r.ppl_protocol) + ".")
    tasks = task_names(rows)
    if tasks:
        limits = {row.task_limit for row in rows if row.tasks}
        shown = ", ".join(f"{r.label}: {r.task_limit}" for r in rows if r.tasks)
        limit_note = ("all documents" if limits == {None} else
                      f"the first {limits.pop()} documents of each task" if len(limits) == 1 else
                      f"**different document limits per row ({shown}), not comparable**")
        splits = {t: next(r.tasks[t].get("split") for r in rows if t in r.tasks) for t in tasks}
        notes.append(f"Tasks: zero-shot lm-eval on local data, {limit_note}; accuracies in %, acc_norm where the "
                     f"task reports it, else acc; splits: " + ", ".join(f"{t} {s}" for t, s in splits.items()) + ".")
        if any(mean_accuracy(r, tasks) is None for r in rows):
            notes.append("Mean accuracy is left out for rows that lack one of the tasks.")
    notes.append("Sparsity: achieved fraction of zeros over the prunable weights, from each checkpoint's "
                 f"{REPORT_FILE}; size: the *.safetensors files of the model directory.")
    notes.append("Sources: " + "; ".join(f"{r.label} = {r.model} ({r.source})" for r in rows) + ".")
    return notes


# ---------------------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend or state

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _series(row: Row) -> str:
    """Plot series: one per method and pattern family (unstructured at any sparsity, or one N:M)."""
    family = "unstructured" if not row.pattern or row.pattern.startswith("unstructured") else row.pattern
    return f"{row.method} {family}"


def plot_ppl_vs_sparsity(rows: list[Row], path: Path) -> Path | None:
    points = [r for r in rows if r.ppl is not None and r.sparsity is not None]
    if not points:
        return None
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    series: dict[str, list[Row]] = {}
    for row in points:
        if row.method == "dense":
            ax.axhline(row.ppl, color="0.4", linestyle="--", linewidth=1)
            ax.scatter([row.sparsity], [row.ppl], color="black", marker="*", s=90, zorder=3, label=f"dense ({row.label})")
        else:
            series.setdefault(_series(row), []).append(row)
    markers = "osD^vP"
    for i, (name, group) in enumerate(sorted(series.items())):
        group = sorted(group, key=lambda r: r.sparsity)
        ax.plot([r.sparsity for r in group], [r.ppl for r in group], marker=markers[i % len(markers)], label=name)
    values = [r.ppl for r in points]
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    protocols = {r.ppl_protocol for r in points}
    ax.set_title("Perplexity vs sparsity" + (f"\n{protocols.pop()}" if len(protocols) == 1 else ""), fontsize=10)
    ax.set_xlabel("sparsity of prunable weights")
    ax.set_ylabel("perplexity")
    ax.set_xlim(-0.03, max(0.8, max(r.sparsity for r in points) + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_accuracy(rows: list[Row], path: Path) -> Path | None:
    tasks = task_names(rows)
    if not tasks:
        return None
    groups = tasks + (["mean"] if all(mean_accuracy(r, tasks) is not None for r in rows) and len(tasks) > 1 else [])
    fig = _figure(min(11.0, 3.0 + 0.3 * len(groups) * len(rows)), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        bars, errors = [], []
        for j, group in enumerate(groups):
            value = mean_accuracy(row, tasks) if group == "mean" else row.accuracy(group)
            if value is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            bars.append((x, 100 * value))
            entry = row.tasks.get(group, {})
            stderr = entry.get(f"{headline(entry)[0]}_stderr") if group != "mean" else None
            if stderr:
                errors.append((x, 100 * value, 100 * stderr))
        ax.bar([x for x, _ in bars], [y for _, y in bars], width, label=row.label)
        if errors:
            ax.errorbar([x for x, _, _ in errors], [y for _, y, _ in errors], yerr=[e for _, _, e in errors],
                        fmt="none", ecolor="black", elinewidth=0.7, capsize=2)
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    limits = {r.task_limit for r in rows if r.tasks}
    subtitle = f", first {limits.pop()} docs per task" if len(limits) == 1 and None not in limits else ""
    ax.set_title(f"Zero-shot accuracy per task (±1 stderr{subtitle})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------- report

def write_report(rows: list[Row], out: str | os.PathLike) -> Path:
    """Write ``report.md``, ``comparison.json`` and the PNG plots into ``out``; returns the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# Dense vs pruned", "", markdown_table(rows), ""]
    sections += [f"- {note}" for note in _notes(rows)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sections += ["", "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."]
    else:
        plots = [plot_ppl_vs_sparsity(rows, out / PPL_PLOT), plot_accuracy(rows, out / ACC_PLOT)]
        for plot in filter(None, plots):
            sections += ["", f"![{plot.stem}]({plot.name})"]
    report = out / REPORT_NAME
    report.write_text("\n".join(sections) + "\n")
    (out / "comparison.json").write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    return report


def compare(models: list[str] = (), results: list[str] = (), out: str | os.PathLike = "report",
            ppl: str | None = None, tasks: list[str] | str | None = None, **eval_options) -> Path:
    """Build the comparison of ``models`` and ``results`` in ``out``; models without a result file are
    evaluated on ``ppl`` and/or ``tasks`` (their records are saved under ``out/results/``)."""
    out = Path(out)
    evaluate = None
    if ppl or tasks:
        def evaluate(model: str) -> dict:
            record = evaluate_model(model, ppl=ppl, tasks=tasks, **eval_options)
            saved = out / "results" / f"{_label(model)}.json"
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(record, indent=1))
            return record
    rows = collect_rows(list(models), list(results), evaluate)
    return write_report(rows, out)
