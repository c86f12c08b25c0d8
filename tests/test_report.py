"""The comparison report: every model, the numbers of its result file, the checkpoint's recipe, plots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.eval import report


def _tasks(piqa: float, arc: float, lambada: float) -> dict:
    return {
        "piqa": {"acc": piqa - 0.01, "acc_stderr": 0.011, "acc_norm": piqa, "acc_norm_stderr": 0.012,
                 "samples": 100, "total": 1838, "split": "validation"},
        "arc_easy": {"acc": arc, "acc_stderr": 0.02, "acc_norm": arc - 0.03, "acc_norm_stderr": 0.02,
                     "samples": 100, "total": 2376, "split": "test"},
        "lambada_openai": {"perplexity": 40.0, "perplexity_stderr": 2.0, "acc": lambada, "acc_stderr": 0.01,
                           "samples": 100, "total": 5153, "split": "test"},
    }


def _checkpoint(directory: Path, method: str | None, pattern: str | None, sparsity: float | None, size: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"\0" * size)
    if method is not None:
        recipe = {"method": method, "pattern": pattern, "calibration": {"spec": "wikitext2"}}
        (directory / "llmprune.json").write_text(json.dumps({"recipe": recipe, "summary": {"sparsity": sparsity},
                                                             "layers": []}))
    return directory


def _result(path: Path, model: Path, ppl: float | None, tasks: dict | None, limit: int | None = 100,
            seqlen: int = 2048) -> Path:
    record: dict = {"model": str(model)}
    if ppl is not None:
        record.update(dataset="wikitext2", ppl=ppl, nll=1.0, seqlen=seqlen, windows=list(range(0, 148, 8)),
                      total_windows=148, tokens=19 * seqlen, seconds=1.0)
    if tasks is not None:
        record.update(tasks=tasks, lm_eval={"limit": limit, "num_fewshot": 0, "seconds": 3.0})
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def three_models(tmp_path: Path) -> dict:
    dense = _checkpoint(tmp_path / "dense-model", None, None, None, 4 * 2**20)
    wanda = _checkpoint(tmp_path / "wanda-24", "wanda", "2:4", 0.5, int(2.25 * 2**20))
    sparsegpt = _checkpoint(tmp_path / "sgpt-60", "sparsegpt", "unstructured:0.6", 0.6012, 4 * 2**20)
    results = {
        "dense": _result(tmp_path / "dense.json", dense, 21.61, _tasks(0.6543, 0.5012, 0.3377)),
        "wanda": _result(tmp_path / "wanda.json", wanda, 38.123, _tasks(0.6011, 0.4321, 0.2002)),
        "sparsegpt": _result(tmp_path / "sgpt.json", sparsegpt, 30.5, _tasks(0.6234, 0.4555, 0.2511)),
    }
    return {"dirs": (dense, wanda, sparsegpt), "results": results, "tmp": tmp_path}


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_report_holds_every_model_with_the_numbers_of_its_result_file(three_models):
    out = three_models["tmp"] / "report"
    path = report.compare(results=[str(p) for p in three_models["results"].values()], out=out)
    text = path.read_text()
    rows = _table_rows(text)
    header = rows["model"]
    assert header == ["model", "method", "pattern", "sparsity", "ppl", "piqa (acc_norm)", "arc_easy (acc_norm)",
                      "lambada_openai (acc)", "mean acc", "size (MiB)"]
    assert rows["dense-model"] == ["dense-model", "dense", "–", "0.0000", "21.61", "65.43", "47.12", "33.77",
                                   "48.77", "4.00"]
    assert rows["wanda-24"] == ["wanda-24", "wanda", "2:4", "0.5000", "38.12", "60.11", "40.21", "20.02",
                                "40.11", "2.25"]
    assert rows["sgpt-60"][:5] == ["sgpt-60", "sparsegpt", "unstructured:0.6", "0.6012", "30.50"]
    assert list(rows)[1:] == ["dense-model", "wanda-24", "sgpt-60"]
    assert "wikitext2, seqlen 2048, 19 of 148 windows" in text and "first 100 documents" in text
    for png in (report.PPL_PLOT, report.ACC_PLOT):
        assert f"]({png})" in text
    assert json.loads((out / "comparison.json").read_text())[1]["ppl"] == 38.123


def test_plots_are_written(three_models):
    pytest.importorskip("matplotlib")
    out = three_models["tmp"] / "report"
    report.compare(results=[str(p) for p in three_models["results"].values()], out=out)
    for name in (report.PPL_PLOT, report.ACC_PLOT):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_models_are_matched_to_their_result_files(three_models):
    dense, wanda, sparsegpt = three_models["dirs"]
    results = three_models["results"]
    rows = report.collect_rows([str(dense), str(sparsegpt)], [str(results["sparsegpt"]), str(results["dense"]),
                                                             str(results["wanda"])])
    assert [(r.label, r.source) for r in rows] == [("dense-model", str(results["dense"])),
                                                    ("sgpt-60", str(results["sparsegpt"])),
                                                    ("wanda-24", str(results["wanda"]))]
    with pytest.raises(LLMPruneError, match=r"no result file for .*wanda-24.*--results.*--ppl/--tasks"):
        report.collect_rows([str(dense), str(wanda)], [str(results["dense"])])


def test_missing_numbers_and_differing_protocols_are_said(three_models):
    tmp = three_models["tmp"]
    dense, wanda, _ = three_models["dirs"]
    only_ppl = _result(tmp / "a.json", dense, 21.61, None, seqlen=1024)
    other = _result(tmp / "b.json", wanda, 38.0, _tasks(0.6, 0.4, 0.2), limit=50)
    text = report.write_report(report.collect_rows(results=[str(only_ppl), str(other)]), tmp / "r").read_text()
    rows = _table_rows(text)
    assert rows["dense-model"][5:] == ["–", "–", "–", "–", "4.00"]
    assert "Perplexity protocols differ" in text and "Mean accuracy is left out" in text


def test_bad_result_files_are_named(tmp_path):
    with pytest.raises(LLMPruneError, match="does not exist"):
        report.read_result(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LLMPruneError, match="not valid JSON"):
        report.read_result(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(LLMPruneError, match="no \"model\" field"):
        report.read_result(tmp_path / "other.json")


def test_cli_eval_json_feeds_cli_compare(tiny_checkpoint, calib_file, tmp_path, capsys):
    """`llmprune eval --json` on a real (tiny) checkpoint, then `compare` evaluating a second model itself."""
    first = tmp_path / "first.json"
    assert main(["eval", str(tiny_checkpoint), "--ppl", str(calib_file), "--seqlen", "32", "--device", "cpu",
                 "--quiet", "--json", str(first)]) == 0
    record = json.loads(first.read_text())
    assert record["model"] == str(tiny_checkpoint) and record["ppl"] > 1 and "tasks" not in record
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["compare", str(tiny_checkpoint), "--results", str(first), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| tiny-llama | dense |" in printed and f"{record['ppl']:.2f}" in printed and "report.md" in printed
    # No result file and nothing to evaluate with: one line, exit 2.
    assert main(["compare", str(tiny_checkpoint), "--out", str(tmp_path / "r2")]) == 2
