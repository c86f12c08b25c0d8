"""The CLI end to end on a local tiny checkpoint, and every bad-input case: one line, exit 2, nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, word_tokenizer
from helpers import assert_nothing_written, prune_args, run_cli

from llmprune.cli import main


def test_prune_info_eval(capsys, tiny_checkpoint, calib_file, tmp_path) -> None:
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, out, "--method", "wanda", "--pattern", "2:4"))
    assert code == 0 and "sparsity 0.5000" in stdout
    report = json.loads((out / "llmprune.json").read_text())
    assert report["recipe"]["pattern"] == "2:4" and report["recipe"]["calibration"]["nsamples"] == 4
    assert len(report["layers"]) == 3 * 7 and all(layer["sparsity"] == 0.5 for layer in report["layers"])
    code, stdout, _ = run_cli(capsys, "info", out)
    assert code == 0 and "model.layers.2.mlp.down_proj" in stdout and "wanda 2:4" in stdout
    code, stdout, _ = run_cli(capsys, "eval", out, "--ppl", calib_file, "--seqlen", "32", "--window-stride", "2",
                              "--json", tmp_path / "ppl.json", "--quiet", "--device", "cpu")
    assert code == 0 and "at seqlen 32" in stdout
    assert json.loads((tmp_path / "ppl.json").read_text())["windows"][:2] == [0, 2]


def test_prune_hybrid_then_info(capsys, tiny_checkpoint, calib_file, tmp_path) -> None:
    out = tmp_path / "hybrid"
    code, stdout, _ = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, out, "--pattern", "hybrid:2:4",
                                                  "--dense-fraction", "0.25", "--hybrid-block", "8",
                                                  "--hybrid-budget", "global", "--hybrid-select", "saliency"))
    assert code == 0 and "sparsity 0.3750" in stdout and "0.250 of them in dense regions" in stdout
    code, stdout, _ = run_cli(capsys, "info", out)
    assert code == 0 and "wanda hybrid:2:4" in stdout and "0.250 of them in dense regions" in stdout


def test_prune_bitmask_then_info_and_eval(capsys, tiny_checkpoint, calib_file, tmp_path) -> None:
    out = tmp_path / "bitmask"
    code, stdout, _ = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, out, "--sparsity", "0.7", "--format", "bitmask"))
    assert code == 0 and "unstructured:0.7" in stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    code, stdout, _ = run_cli(capsys, "info", out)
    line = next(line for line in stdout.splitlines() if line.startswith("model.layers.0.mlp.down_proj"))
    assert code == 0 and 0.3 < float(line.split()[-1]) < 0.4  # 30% kept + bitmask + offsets, fp32
    code, stdout, _ = run_cli(capsys, "eval", out, "--ppl", calib_file, "--seqlen", "32", "--quiet", "--device", "cpu")
    assert code == 0 and "at seqlen 32" in stdout


@pytest.mark.parametrize("extra,message", [
    (["--method", "obs"], "unknown method 'obs'"),
    (["--pattern", "2-4"], "unknown pattern '2-4'"),
    (["--sparsity", "1.0"], r"sparsity must be in \[0, 1\)"),
    (["--sparsity", "-0.5"], r"sparsity must be in \[0, 1\)"),
    (["--method", "wanda", "--blocksize", "64"], "takes no option"),
    (["--allocation", "owl", "--pattern", "2:4"], "OWL allocates unstructured sparsity"),
    (["--dsnot-cycles", "5"], "--dsnot-\\* options need --refine dsnot"),
    (["--pattern", "hybrid:2:4", "--dense-fraction", "1.5"], r"dense-fraction must be in \[0, 1\)"),
    (["--pattern", "2:4", "--dense-fraction", "0.25"], "hybrid pattern only"),
    (["--pattern", "hybrid:2:4", "--hybrid-block", "6"], "multiple of M=4"),
    (["--pattern", "2:4", "--format", "bitmask"], "saved packed 2:4"),
    (["--refine", "dsnot", "--dsnot-cycles", "-1"], "cycles"),
    (["--nsamples", "64", "--seqlen", "60"], "has [0-9]+ tokens; windows of seqlen=60"),
    (["--seqlen", "4096"], "exceeds the model's max_position_embeddings 64"),
])
def test_bad_input(capsys, tiny_checkpoint, tmp_path, extra, message) -> None:
    calib = tmp_path / "short.txt"
    calib.write_text("w1 w2 w3 " * 20)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *prune_args(tiny_checkpoint, calib, out), *extra)
    assert code == 2
    assert err.startswith("llmprune: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert_nothing_written(out)


def test_nm_that_does_not_divide_names_the_layer(capsys, tmp_path, calib_file) -> None:
    directory = tmp_path / "odd"
    tiny_model("llama", intermediate_size=66).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *prune_args(directory, calib_file, out, "--pattern", "2:4"))
    assert code == 2 and "model.layers.0.mlp.down_proj has 66 = 16*4+2" in err
    assert_nothing_written(out)


def test_missing_and_corrupt_model(capsys, tmp_path, calib_file, tiny_checkpoint) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *prune_args(tmp_path / "nothing-here", calib_file, out))
    assert code == 2 and "does not exist" in err
    (tiny_checkpoint / "model.safetensors").write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, out))  # out of core: the header is read first
    assert code == 2 and "model.safetensors is truncated or corrupt" in err
    code, _, err = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, out, "--in-memory"))
    assert code == 2 and "cannot load model" in err
    assert_nothing_written(out)


def test_nan_activations(capsys, tmp_path, calib_file) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.fill_(float("inf"))
    directory = tmp_path / "broken"
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *prune_args(directory, calib_file, out))
    assert code == 2 and "NaN or Inf" in err and "decoder layer 2" in err
    assert_nothing_written(out)


def test_existing_output_is_kept_unless_overwrite(capsys, tiny_checkpoint, calib_file, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, out))
    assert code == 2 and "exists and is not empty; pass --overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, _ = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, out, "--overwrite"))
    assert code == 0 and not (out / "precious.txt").exists() and (out / "llmprune.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_failed_write_leaves_nothing(monkeypatch, tmp_path) -> None:
    """A disk that fills up mid-save: clear error, no half checkpoint under the output name."""
    from llmprune.errors import LLMPruneError
    from llmprune.checkpoint import save
    from llmprune.checkpoint.safetensors import SafetensorsWriter

    model = tiny_model("llama")

    write_next = SafetensorsWriter.write_next

    def full_disk(self):
        if self.written == 3:  # a few tensors in
            raise OSError(28, "No space left on device")
        return write_next(self)

    monkeypatch.setattr(SafetensorsWriter, "write_next", full_disk)
    out = tmp_path / "out"
    with pytest.raises(LLMPruneError, match="No space left on device; nothing was written"):
        save(model, out)
    assert_nothing_written(out)


def test_info_on_a_directory_without_report(capsys, tiny_checkpoint) -> None:
    code, _, err = run_cli(capsys, "info", tiny_checkpoint)
    assert code == 2 and "has no llmprune.json" in err


def test_help_mentions_every_method(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "magnitude" in capsys.readouterr().out


def test_dsnot_and_owl_from_the_cli(capsys, tiny_checkpoint, calib_file, tmp_path) -> None:
    out = tmp_path / "refined"
    code, stdout, err = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, out, "--method", "wanda", "--sparsity", "0.6",
                                                    "--refine", "dsnot", "--dsnot-skip", "mlp", "--allocation", "owl"))
    assert code == 0, err
    recipe = json.loads((out / "llmprune.json").read_text())["recipe"]
    assert recipe["refine"] == {"name": "dsnot", "skip": ["mlp"]}
    assert recipe["allocation"]["name"] == "owl" and len(recipe["allocation"]["sparsities"]) == 3


def test_export_packed_to_dense(capsys, tiny_checkpoint, calib_file, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    import llmprune

    packed, dense = tmp_path / "packed", tmp_path / "dense"
    code, _, err = run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, packed, "--pattern", "2:4"))
    assert code == 0, err
    assert "sparse-24-bitmask" in (packed / "config.json").read_text()
    code, stdout, err = run_cli(capsys, "export", packed, "--dense", dense)
    assert code == 0 and "wrote a dense checkpoint" in stdout, err
    assert "quantization_config" not in (dense / "config.json").read_text()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = llmprune.load(packed, backend="dense")(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(dense)(input_ids=ids).logits
    assert torch.equal(expected, got)
    code, _, err = run_cli(capsys, "export", packed, "--dense", dense)
    assert code == 2 and "pass --overwrite" in err
