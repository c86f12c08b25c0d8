"""Zero-shot tasks with lm-eval on local data, run on the model in memory.

The task configs live in ``llmprune/eval/tasks/`` (one YAML per task, lm-eval's official prompt,
target, choices and metrics; ``utils.py`` holds their document hooks). They are package data, so a
plain ``pip install`` (wheel, not editable) carries them and the commands need no source checkout.
Their lm-eval names carry an ``llmprune_`` prefix so they never shadow lm-eval's own tasks; users
name them without it (``piqa``, ``arc_easy``, ...).

Where the data comes from: each YAML reads ``dataset_path: json`` with ``data_files`` written
as ``"../shared/data/tasks/<file>.jsonl"``, the default layout relative to the repo root, so the
folder also works as is with ``lm_eval --include_path llmprune/eval/tasks`` run from there. For a run,
:func:`evaluate_tasks` copies the folder to a temporary include dir, rewriting that prefix to the
data folder in use: ``data_dir`` when given, else ``$LLMPRUNE_SHARED/data/tasks`` (default
``../shared/data/tasks`` beside the repo). Nothing is downloaded; the model is wrapped in
``HFLM(pretrained=model)`` and never reloaded.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import LLMPruneError
from ..state import state
from ..resources import shared_dir

TASK_PREFIX = "llmprune_"
# The data location written in the YAMLs (relative to the repo root); replaced at run time.
DATA_PLACEHOLDER = "../shared/data/tasks/"
# Metrics kept from lm-eval's results, in display order.
METRICS = ("perplexity", "acc", "acc_norm")
# Bootstrap resamples for stderrs without a closed form (LAMBADA perplexity). lm-eval's default
# of 100000 takes minutes on a CPU; accuracy stderrs are closed-form and do not depend on it.
BOOTSTRAP_ITERS = 1000


def default_tasks_dir() -> Path:
    """The task configs shipped inside the package (``llmprune/eval/tasks``), wherever it is installed."""
    return Path(__file__).resolve().parent / "tasks"


def default_data_dir() -> Path:
    """``$LLMPRUNE_SHARED/data/tasks`` (default ``../shared/data/tasks`` beside the repo)."""
    return shared_dir() / "data" / "tasks"


@dataclass(frozen=True)
class LocalTask:
    """One task config of the tasks folder."""

    name: str  # what users type: "piqa"
    lm_eval_name: str  # the YAML's ``task``: "llmprune_piqa"
    config: Path
    data_files: dict[str, str]  # split -> file name inside the data folder

    @property
    def split(self) -> str:
        return next(iter(self.data_files))


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads task YAMLs for their names and data files without importing ``!function`` hooks."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read_config(path: Path) -> dict:
    config = yaml.load(path.read_text(), Loader=_TagTolerantLoader) or {}
    includes = config.pop("include", None)
    merged: dict = {}
    for include in [includes] if isinstance(includes, str) else includes or []:
        merged.update(_read_config(path.parent / include))
    return {**merged, **config}


def local_tasks(tasks_dir: str | Path | None = None) -> dict[str, LocalTask]:
    """The tasks defined in ``tasks_dir`` (default: the configs shipped in the package), keyed by user-facing name."""
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise LLMPruneError(f"task config folder {tasks_dir} does not exist; pass --tasks-dir pointing at a folder "
                            f"of lm-eval task YAMLs, or leave it out to use the configs shipped with llmprune")
    tasks_dir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    if not tasks_dir.is_dir():
        raise LLMPruneError(f"the task configs that ship with llmprune are missing ({tasks_dir}): the installation "
                            f"is incomplete; reinstall llmprune, or pass --tasks-dir pointing at a folder of task YAMLs")
    tasks = {}
    for path in sorted(tasks_dir.glob("*.yaml")):
        config = _read_config(path)
        lm_eval_name = config.get("task")
        if not isinstance(lm_eval_name, str):
            continue
        name = lm_eval_name.removeprefix(TASK_PREFIX)
        data_files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        if isinstance(data_files, str):
            data_files = {"train": data_files}
        files = {split: Path(file).name if str(file).startswith(DATA_PLACEHOLDER) else str(file)
                 for split, file in data_files.items()}
        tasks[name] = LocalTask(name, lm_eval_name, path, files)
    return tasks


def resolve_tasks(names: list[str] | str, tasks_dir: str | Path | None = None) -> list[LocalTask]:
    """Look up task names (``piqa`` or ``llmprune_piqa``; a comma-separated string works too)."""
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise LLMPruneError("no task given; name one or more of: " + ", ".join(local_tasks(tasks_dir)))
    available = local_tasks(tasks_dir)
    unknown = [n for n in names if n.removeprefix(TASK_PREFIX) not in available]
    if unknown:
        raise LLMPruneError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"available offline: {', '.join(available) or '(none)'}")
    resolved = [available[n.removeprefix(TASK_PREFIX)] for n in names]
    return list({task.name: task for task in resolved}.values())


def check_data(tasks: list[LocalTask], data_dir: str | Path | None = None) -> Path:
    """The data folder, after checking every file the tasks read is in it."""
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    missing = [f"{task.name}: {file}" for task in tasks for file in task.data_files.values()
               if not (data_dir / file).is_file()]
    if missing:
        raise LLMPruneError(f"task data not found in {data_dir} ({'; '.join(missing)}); the task data folder is "
                            f"$LLMPRUNE_SHARED/data/tasks (default ../shared/data/tasks beside the repo): "
                            f"set LLMPRUNE_SHARED or pass --data-dir to the folder holding the .jsonl files")
    return data_dir.resolve()


@contextmanager
def materialised_tasks(tasks_dir: str | Path | None = None, data_dir: str | Path | None = None) -> Iterator[Path]:
    """A temporary copy of the tasks folder whose YAMLs read their data from ``data_dir``."""
    tasks_dir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir().resolve()
    # The placeholder sits inside double-quoted YAML scalars; a JSON string body is a valid one.
    quoted_dir = json.dumps(data_dir.as_posix() + "/")[1:-1]
    with tempfile.TemporaryDirectory(prefix="llmprune-tasks-") as tmp:
        for path in tasks_dir.iterdir():
            if path.suffix == ".yaml":
                text = path.read_text().replace(f'"{DATA_PLACEHOLDER}', f'"{quoted_dir}')
                (Path(tmp) / path.name).write_text(text)
            elif path.suffix == ".py":
                shutil.copy(path, Path(tmp) / path.name)
        yield Path(tmp)


def task_manager(include_path: str | Path):
    """An lm-eval TaskManager that indexes only ``include_path`` (indexing lm-eval's ~15k tasks takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path), include_defaults=False)


def _hflm(model, batch_size: int, progress: bool):
    from lm_eval.models.huggingface import HFLM

    class LocalHFLM(HFLM):
        """HFLM over the in-memory model; ``progress=False`` silences its request progress bar."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    tokenizer = state(model).tokenizer
    if tokenizer is None:
        raise LLMPruneError("task evaluation needs the tokenizer; load the model with llmprune.load")
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its warning that a model object (not a name) was passed is expected here
    try:
        return LocalHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_logger.setLevel(level)


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for a stderr it cannot compute
    return None if math.isnan(value) else value


def evaluate_tasks(model, tasks: list[str] | str, limit: int | float | None = None, batch_size: int = 16,
                   device=None, tasks_dir: str | Path | None = None, data_dir: str | Path | None = None,
                   bootstrap_iters: int = BOOTSTRAP_ITERS, progress: bool = True) -> dict:
    """Zero-shot accuracy of ``model`` on local lm-eval tasks.

    ``tasks``: names such as ``["piqa", "arc_easy"]`` (see :func:`local_tasks`). ``limit``: score
    only the first ``limit`` documents of each task (a fraction < 1 takes that share). ``device``:
    move the model there first (default: where it is). Returns::

        {"tasks": {"piqa": {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": ..,
                            "samples": 20, "total": 1838, "split": "validation", ...}, ...},
         "limit": 20, "num_fewshot": 0, "seconds": .., "batch_size": .., "device": "cpu",
         "data_dir": "...", "lm_eval_version": "0.4.13"}

    LAMBADA reports ``perplexity`` and ``acc``; BoolQ and WinoGrande report ``acc`` only, as in lm-eval.
    """
    from importlib.metadata import version

    import datasets
    import lm_eval

    selected = resolve_tasks(tasks, tasks_dir)
    data_dir = check_data(selected, data_dir)
    if limit is not None and limit <= 0:
        raise LLMPruneError(f"limit must be positive, got {limit}")
    if device is not None:
        from ..device import resolve_device

        model = model.to(resolve_device(device))
    lm = _hflm(model, batch_size, progress)
    progress_bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    started = time.perf_counter()
    try:
        with materialised_tasks(tasks_dir, data_dir) as include_dir:
            output = lm_eval.simple_evaluate(
                model=lm, tasks=[task.lm_eval_name for task in selected], limit=limit,
                batch_size=batch_size, task_manager=task_manager(include_dir), bootstrap_iters=bootstrap_iters,
                log_samples=False)
    finally:
        if progress_bars:
            datasets.enable_progress_bars()
    seconds = time.perf_counter() - started
    results = {}
    for task in selected:
        raw = output["results"][task.lm_eval_name]
        counts = output.get("n-samples", {}).get(task.lm_eval_name, {})
        entry: dict = {}
        for metric in METRICS:
            if f"{metric},none" in raw:
                entry[metric] = _number(raw[f"{metric},none"])
                entry[f"{metric}_stderr"] = _number(raw.get(f"{metric}_stderr,none"))
        entry.update(samples=counts.get("effective"), total=counts.get("original"), split=task.split,
                     lm_eval_task=task.lm_eval_name, version=output.get("versions", {}).get(task.lm_eval_name))
        results[task.name] = entry
    return {"tasks": results, "limit": limit, "num_fewshot": 0, "seconds": seconds, "batch_size": batch_size,
            "device": str(next(model.parameters()).device), "data_dir": str(data_dir),
            "bootstrap_iters": bootstrap_iters, "lm_eval_version": version("lm_eval")}


def headline(entry: dict) -> tuple[str, float | None]:
    """The one accuracy a task is summarised by: acc_norm where the task reports it, else acc."""
    metric = "acc_norm" if entry.get("acc_norm") is not None else "acc"
    return metric, entry.get(metric)


def describe_tasks(result: dict) -> str:
    """Lines for the terminal: one per task, then the run's settings and time."""
    width = max((len(name) for name in result["tasks"]), default=0)
    lines = []
    for name, entry in result["tasks"].items():
        parts = []
        for metric in METRICS:
            if metric in entry:
                value, stderr = entry[metric], entry.get(f"{metric}_stderr")
                label = "ppl" if metric == "perplexity" else metric
                spec = ".4g" if metric == "perplexity" else ".4f"
                shown = "nan" if value is None else format(value, spec)
                parts.append(f"{label} {shown}" + ("" if stderr is None else f" ± {format(stderr, spec)}"))
        lines.append(f"{name:<{width}}  {'  '.join(parts)}  ({entry['samples']} of {entry['total']} docs, "
                     f"{entry['split']})")
    limit = "" if result["limit"] is None else f", limit {result['limit']}"
    lines.append(f"lm-eval {result['lm_eval_version']}, zero-shot{limit}, batch size {result['batch_size']}, "
                 f"{result['device']}: {result['seconds']:.1f} s")
    return "\n".join(lines)
