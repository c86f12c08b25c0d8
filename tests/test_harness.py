"""Local lm-eval tasks: the same requests as lm-eval's official tasks, offline, and a real run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import SHARED, STORIES, needs_stories
from llmprune.errors import LLMPruneError
from llmprune.eval import harness

lm_eval = pytest.importorskip("lm_eval")

TASK_DATA = SHARED / "data" / "tasks"
needs_task_data = pytest.mark.skipif(not TASK_DATA.is_dir(),
                                     reason=f"task data not found at {TASK_DATA} (set LLMPRUNE_SHARED)")
OFFICIAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
NDOCS = 3

# Our task -> lm-eval's official config (relative to lm_eval/tasks).
OFFICIAL = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}


def _first_docs(file_name: str, n: int = NDOCS) -> list[dict]:
    with open(TASK_DATA / file_name) as lines:
        return [json.loads(next(lines)) for _ in range(n)]


def _hellaswag_docs(file_name: str) -> list[dict]:
    """The first documents, and the first two that exercise the cleaning (WikiHow [tags], double spaces)."""
    docs, extra = _first_docs(file_name), []
    with open(TASK_DATA / file_name) as lines:
        for line in lines:
            if "[title]" in line or "  " in line:
                extra.append(json.loads(line))
                if len(extra) == 2:
                    break
    return docs + extra


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))


def _docs_for(task: harness.LocalTask) -> tuple[list[dict], list[dict]]:
    """(documents in the schema of our local file, the same documents in the official dataset's schema)."""
    file_name = task.data_files[task.split]
    if task.name.startswith("arc_"):
        # The local ARC test files are preprocessed (see test_arc_test_files_render_their_query); the
        # validation files carry allenai/ai2_arc's fields, and our config must accept those as well.
        docs = _first_docs(file_name.replace(".test.", ".validation."))
        return docs, docs
    docs = _hellaswag_docs(file_name) if task.name == "hellaswag" else _first_docs(file_name)
    if task.name == "boolq":  # google/boolq's bool answer is aps/super_glue's 0/1 label
        return docs, [{"question": d["question"], "passage": d["passage"], "idx": i, "label": int(d["answer"])}
                      for i, d in enumerate(docs)]
    if task.name == "lambada_openai":  # the local file splits EleutherAI/lambada_openai's text before its last word
        return docs, [{"text": f"{d['query']} {d['answers_text'][0]}"} for d in docs]
    return docs, docs


def _official_config(name: str, split: str, data_file: Path) -> dict:
    """The official YAML, included as is, with only its dataset swapped for a local file."""
    config = {"include": str(OFFICIAL_TASKS / OFFICIAL[name]), "task": f"official_{name}",
              "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {split: str(data_file)}},
              "training_split": None, "validation_split": None, "test_split": None}
    config[f"{split}_split"] = split
    return config


def _requests(task) -> list[tuple]:
    task.build_all_requests()
    return [tuple(instance.arguments) for instance in task.instances]


def _targets(task) -> list:
    return [task.doc_to_target(doc) for doc in task.eval_docs]


def _facts(task) -> dict:
    config = task.config
    return {"output_type": config.output_type, "target_delimiter": config.target_delimiter,
            "metrics": sorted(task._metric_fn_list), "aggregation": {k: v.__name__ for k, v in task.aggregation().items()},
            "higher_is_better": task.higher_is_better(), "version": config.metadata.get("version")}


def test_every_task_is_listed_and_mapped():
    tasks = harness.local_tasks()
    assert sorted(tasks) == sorted(OFFICIAL)
    for name, task in tasks.items():
        assert task.lm_eval_name == f"llmprune_{name}" and task.data_files
    assert [t.name for t in harness.resolve_tasks("piqa, llmprune_arc_easy,piqa")] == ["piqa", "arc_easy"]


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(LLMPruneError, match=r"unknown task mmlu; available offline: .*hellaswag.*piqa"):
        harness.resolve_tasks(["piqa", "mmlu"])


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(LLMPruneError, match=rf"not found in {tmp_path}.*piqa.validation.jsonl.*LLMPRUNE_SHARED.*--data-dir"):
        harness.check_data(harness.resolve_tasks(["piqa"]), tmp_path)


def test_default_data_dir_follows_llmprune_shared(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPRUNE_SHARED", str(tmp_path))
    assert harness.default_data_dir() == tmp_path / "data" / "tasks"


def test_materialised_configs_point_at_the_data_dir(tmp_path):
    data_dir = tmp_path / 'odd "dir" \\ here'
    with harness.materialised_tasks(data_dir=data_dir) as include_dir:
        configs = {path.name: harness._read_config(path) for path in include_dir.glob("*.yaml")}
        assert (include_dir / "utils.py").exists()
    assert configs["piqa.yaml"]["dataset_kwargs"]["data_files"] == {
        "validation": (data_dir.resolve() / "piqa.validation.jsonl").as_posix()}
    assert configs["arc_challenge.yaml"]["dataset_kwargs"]["data_files"]["test"].endswith("/arc_challenge.test.jsonl")


@needs_task_data
@pytest.mark.slow
def test_requests_equal_the_official_tasks(tmp_path):
    """For each task, the first documents give the same contexts, continuations, targets and metrics."""
    local_dir, official_dir, official_data = tmp_path / "local", tmp_path / "official", tmp_path / "official_data"
    official_dir.mkdir()
    tasks = harness.local_tasks()
    for task in tasks.values():
        local_docs, official_docs = _docs_for(task)
        _write_jsonl(local_dir / task.data_files[task.split], local_docs)
        official_file = official_data / f"{task.name}.jsonl"
        _write_jsonl(official_file, official_docs)
        config = _official_config(task.name, task.split, official_file)
        (official_dir / f"{task.name}.yaml").write_text(yaml.safe_dump(config))

    official = harness.task_manager(official_dir).load([f"official_{name}" for name in tasks])["tasks"]
    with harness.materialised_tasks(data_dir=local_dir) as include_dir:
        ours = harness.task_manager(include_dir).load([task.lm_eval_name for task in tasks.values()])["tasks"]
    for name, task in tasks.items():
        mine, theirs = ours[task.lm_eval_name], official[f"official_{name}"]
        assert _requests(mine) == _requests(theirs), name
        assert len({instance.doc_id for instance in mine.instances}) >= NDOCS, name
        assert _targets(mine) == _targets(theirs), name
        assert _facts(mine) == _facts(theirs), name


@needs_task_data
@pytest.mark.slow
@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "lambada_openai"])
def test_preprocessed_files_render_their_query(name, tmp_path):
    """The ARC test and LAMBADA files hold the rendered prompt (``query``): our configs reproduce it."""
    task = harness.local_tasks()[name]
    file_name = task.data_files[task.split]
    docs = _first_docs(file_name)
    _write_jsonl(tmp_path / file_name, docs)
    with harness.materialised_tasks(data_dir=tmp_path) as include_dir:
        built = harness.task_manager(include_dir).load([task.lm_eval_name])["tasks"][task.lm_eval_name]
    requests = _requests(built)
    if name == "lambada_openai":
        assert requests == [(d["query"], " " + d["answers_text"][0]) for d in docs]
    else:
        assert requests == [(d["query"], " " + choice) for d in docs for choice in d["choices"]]
        assert _targets(built) == [d["gold"] for d in docs]


@needs_stories
@needs_task_data
@pytest.mark.slow
def test_real_model_run_is_bounded_and_deterministic():
    import llmprune

    model = llmprune.load(STORIES)
    runs = [harness.evaluate_tasks(model, ["piqa", "arc_easy", "lambada_openai"], limit=5, batch_size=8,
                                   progress=False) for _ in range(2)]
    first, second = runs
    assert first["tasks"] == second["tasks"]
    assert first["limit"] == 5 and first["seconds"] > 0
    for name in ("piqa", "arc_easy"):
        entry = first["tasks"][name]
        assert entry["samples"] == 5 and 0 <= entry["acc"] <= 1 and 0 <= entry["acc_norm"] <= 1
    lambada = first["tasks"]["lambada_openai"]
    assert 0 <= lambada["acc"] <= 1 and lambada["perplexity"] > 1 and "acc_norm" not in lambada
    text = harness.describe_tasks(first)
    assert "piqa" in text and "5 of 1838 docs" in text and "limit 5" in text
