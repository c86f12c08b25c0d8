"""Plain ``transformers.from_pretrained`` on our checkpoints: the logits of ``llmprune.load(dir, backend="dense")``
exactly, or an error; never a model with random weights where the packed linears are (issue #15).

- llmprune imported (this process): packed 2:4, hybrid and sparse-bitmask checkpoints, old ones (0.1.0, no
  guard) included, load to exactly ``llmprune.load``'s logits with nothing missing or unexpected, and
  ``save_pretrained`` of the result is a dense checkpoint plain transformers loads.
- llmprune not imported (a subprocess that never imports it): ``from_pretrained`` raises. Here, without
  compressed-tensors, transformers asks for it (ImportError); the ``transformers_weights`` guard, which
  is what fails once compressed-tensors >= 0.15 is installed, is checked on a copy of each config without
  its compressed-tensors block (what such a stack effectively reads), and must name ``llmprune.load``.
- ``import llmprune`` does not import transformers' quantizer registry (seconds); the registration happens
  when that module is first imported (checked with a stand-in registry here, for real in the slow test).
- ``slow``: the same with compressed-tensors really installed (pip, from PyPI; skipped when unreachable),
  and the import-time laziness in a fresh interpreter.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import llmprune
from llmprune import hf_integration
from llmprune.checkpoint.writer import GUARD_KEY, PACKING_KEY
from llmprune.sparse_linear import SparseLinear

OLD_CHECKPOINTS = Path(__file__).parent / "fixtures" / "v0.1"
REPO = Path(__file__).resolve().parents[1]
# name → (model type, pattern, prune options, save options)
KINDS = {
    "packed-24": ("llama", "2:4", {}, {}),
    "hybrid": ("llama", "hybrid:2:4", {"dense_fraction": 0.25, "hybrid_block": 8}, {}),
    "bitmask": ("llama", "unstructured", {}, {"storage": "bitmask"}),
    "gpt2-packed-24": ("gpt2", "2:4", {}, {}),  # Conv1D linears, lm_head tied to the embeddings
    "packed-24-int4": ("llama", "2:4", {"method": "sparsegpt", "quantize": "w4", "group_size": 16}, {}),
}
INPUT = torch.arange(3, 19).reshape(1, -1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint of each kind, with the logits ``llmprune.load(dir, backend="dense")`` gives (``ref.pt``)."""
    root = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    made = {}
    for name, (model_type, pattern, prune_options, save_options) in KINDS.items():
        model = tiny_model(model_type, seed=3)
        options = {"method": "wanda", **prune_options}
        llmprune.prune(model, pattern=pattern, calib_tokens=tokens, device="cpu", progress=False, **options)
        directory = llmprune.save(model, root / name, **save_options)
        torch.save(_logits(llmprune.load(directory, device="cpu", backend="dense")), directory / "ref.pt")
        made[name] = directory
    return made


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("name", list(KINDS))
def test_checkpoints_carry_the_guard(checkpoints: dict[str, Path], name: str) -> None:
    config = _config(checkpoints[name])
    assert "llmprune.load" in config[GUARD_KEY]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"  # legacy readers still see it


@pytest.mark.parametrize("name", list(KINDS))
def test_from_pretrained_with_llmprune_imported_gives_llmprune_load(checkpoints: dict[str, Path], name: str,
                                                                   tmp_path: Path) -> None:
    directory = checkpoints[name]
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert torch.equal(_logits(model), torch.load(directory / "ref.pt"))
    kinds = {type(module) for module in model.modules()}
    assert (SparseLinear in kinds) == (name != "bitmask")
    assert not any(isinstance(module, hf_integration.PackedPlaceholder) for module in model.modules())
    for attr in ("quantization_config", PACKING_KEY, GUARD_KEY):
        assert getattr(model.config, attr, None) is None, attr
    assert getattr(model, "hf_quantizer", None) is None
    # What save_pretrained writes is an ordinary dense checkpoint, with the same logits (up to summation
    # order for hybrid layers, which llmprune computes as a 2:4 and a dense GEMM).
    model.save_pretrained(tmp_path / "dense")
    assert not {"quantization_config", PACKING_KEY, GUARD_KEY} & set(_config(tmp_path / "dense"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert all(type(module) is not SparseLinear for module in dense.modules())
    torch.testing.assert_close(_logits(dense), torch.load(directory / "ref.pt"), rtol=0, atol=1e-5)


def test_from_pretrained_honours_dtype(checkpoints: dict[str, Path]) -> None:
    directory = checkpoints["hybrid"]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    expected = llmprune.load(directory, device="cpu", dtype=torch.bfloat16, backend="dense")
    assert torch.equal(_logits(model), _logits(expected))


@pytest.mark.parametrize("name", sorted(p.name for p in OLD_CHECKPOINTS.iterdir()))
def test_checkpoints_of_0_1_load_through_from_pretrained(name: str) -> None:
    """Written before the guard existed: with llmprune imported they load right too."""
    directory = OLD_CHECKPOINTS / name
    assert GUARD_KEY not in _config(directory)
    expected = _logits(llmprune.load(directory, device="cpu", backend="dense"))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(directory)), expected)


def test_other_compressed_tensors_configs_go_to_compressed_tensors() -> None:
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AutoQuantizationConfig,
    )

    ours = _config(OLD_CHECKPOINTS / "gpt2-packed-24")["quantization_config"]
    assert hf_integration.claims(ours) and hf_integration.claims({"quantization_config": ours})
    quantized = {**ours, "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4}}}}
    unknown = {**ours, "sparsity_config": {**ours["sparsity_config"], "format": "sparse-something-else"}}
    assert not hf_integration.claims(quantized) and not hf_integration.claims(unknown)
    assert not hf_integration.claims({"quant_method": "gptq", "sparsity_config": ours["sparsity_config"]})
    assert AutoQuantizationConfig.from_dict(ours).quant_method == hf_integration.METHOD
    original = AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"]._llmprune_original
    try:
        config = AutoQuantizationConfig.from_dict(quantized)
    except ImportError as exc:  # compressed-tensors absent: exactly what its own class does
        assert "compressed-tensors" in str(exc)
    else:
        assert type(config) is original


def _python(script: str, env_extra: dict[str, str] | None = None, args: list[str] = (), timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# Runs without importing llmprune: every from_pretrained must raise. Prints one JSON line per attempt.
_PLAIN = textwrap.dedent('''
    import json, sys
    from transformers import AutoModelForCausalLM
    for directory in sys.argv[1:]:
        try:
            AutoModelForCausalLM.from_pretrained(directory)
            outcome = ("loaded", "")
        except Exception as exc:
            outcome = (type(exc).__name__, str(exc))
        print(json.dumps([directory, *outcome]))
    assert "llmprune" not in sys.modules
''')


def _plain_outcomes(directories: list[Path], env_extra: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    out = _python(_PLAIN, env_extra, args=[str(d) for d in directories])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    return {row[0]: (row[1], row[2]) for row in rows}


def _without_compressed_tensors_block(source: Path, target: Path) -> Path:
    """A copy whose config.json lacks quantization_config: what a stack that ignores the sparsity block reads."""
    shutil.copytree(source, target)
    config = _config(target)
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def test_from_pretrained_without_llmprune_refuses(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ct_major_minor = tuple(int(part) for part in version("compressed-tensors").split(".")[:2])
    except PackageNotFoundError:
        ct_major_minor = None
    real = [checkpoints[name] for name in KINDS]
    guarded = [_without_compressed_tensors_block(checkpoints[name], tmp_path / name) for name in KINDS]
    outcomes = _plain_outcomes(real + guarded)
    assert len(outcomes) == len(real) + len(guarded), outcomes
    for directory in real:
        kind, message = outcomes[str(directory)]
        if ct_major_minor is None or ct_major_minor < (0, 15):
            assert kind == "ImportError" and "compressed-tensors" in message, (directory, kind, message)
        else:
            assert kind == "ValueError" and "llmprune.load" in message, (directory, kind, message)
    for directory in guarded:
        kind, message = outcomes[str(directory)]
        assert kind == "ValueError" and "llmprune.load" in message, (directory, kind, message)


_FAKE_REGISTRY = textwrap.dedent('''
    """Stands in for transformers.quantizers.auto: the two mappings and the two register functions."""
    from transformers.utils.quantization_config import QuantizationConfigMixin


    class Legacy(QuantizationConfigMixin):
        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            return "legacy"


    AUTO_QUANTIZATION_CONFIG_MAPPING = {"compressed-tensors": Legacy}
    AUTO_QUANTIZER_MAPPING = {}


    def register_quantization_config(method):
        def register(cls):
            AUTO_QUANTIZATION_CONFIG_MAPPING[method] = cls
            return cls
        return register


    def register_quantizer(name):
        def register(cls):
            AUTO_QUANTIZER_MAPPING[name] = cls
            return cls
        return register
''')


def test_registration_waits_for_the_registry_import(tmp_path: Path, monkeypatch) -> None:
    """``import llmprune`` leaves a finder instead of importing the registry (seconds); the registry's first
    import registers our formats and removes the finder. (The slow test checks it in a fresh interpreter
    with the real registry.)"""
    name = "llmprune_test_fake_registry"
    (tmp_path / f"{name}.py").write_text(_FAKE_REGISTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(hf_integration, "REGISTRY_MODULE", name)
    monkeypatch.setattr(hf_integration, "_registered", False)
    ours = _config(OLD_CHECKPOINTS / "llama-hybrid")["quantization_config"]
    try:
        hf_integration.install()
        assert name not in sys.modules
        assert any(isinstance(finder, hf_integration._RegistryFinder) for finder in sys.meta_path)
        registry = importlib.import_module(name)
        assert not any(isinstance(finder, hf_integration._RegistryFinder) for finder in sys.meta_path)
        assert hf_integration.METHOD in registry.AUTO_QUANTIZER_MAPPING
        dispatch = registry.AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"]
        assert dispatch.from_dict(ours).quant_method == hf_integration.METHOD
        assert dispatch.from_dict({"quant_method": "compressed-tensors", "format": "pack-quantized"}) == "legacy"
        hf_integration.register(registry)  # idempotent: nothing wrapped twice
        assert registry.AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] is dispatch
    finally:
        hf_integration._remove_finder()
        sys.modules.pop(name, None)


@pytest.fixture
def compressed_tensors_packages(tmp_path_factory) -> Path:
    """compressed-tensors (and loguru, its one dependency this environment lacks) pip-installed into a folder
    to put on PYTHONPATH; skips the test when PyPI cannot be reached."""
    target = tmp_path_factory.mktemp("ct")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                           "--retries", "1", "--timeout", "20", "--target", str(target), "compressed-tensors>=0.15",
                           "loguru"], capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot pip install compressed-tensors (no index reachable?): {proc.stderr.strip()[-300:]}")
    return target


@pytest.mark.slow
def test_with_compressed_tensors_installed(compressed_tensors_packages: Path, checkpoints: dict[str, Path]) -> None:
    """compressed-tensors >= 0.15 (no sparse decompressor): without llmprune the guard refuses each checkpoint,
    naming llmprune.load; with llmprune imported each loads to llmprune.load's logits."""
    path = [str(compressed_tensors_packages), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(path)}
    directories = [checkpoints[name] for name in KINDS]
    outcomes = _plain_outcomes(directories, env)
    for directory in directories:
        kind, message = outcomes[str(directory)]
        assert kind == "ValueError" and "llmprune.load" in message, (directory, kind, message)
    script = textwrap.dedent(f'''
        import sys, torch
        import llmprune
        assert "transformers.quantizers.auto" not in sys.modules, "import llmprune imported the quantizer registry"
        import compressed_tensors
        from transformers import AutoModelForCausalLM
        assert not any(type(f).__name__ == "_RegistryFinder" for f in sys.meta_path)
        for directory in {[str(d) for d in directories]!r}:
            with torch.no_grad():
                logits = AutoModelForCausalLM.from_pretrained(directory)(torch.arange(3, 19).reshape(1, -1)).logits
            assert torch.equal(logits, torch.load(directory + "/ref.pt")), directory
        print("ok")
    ''')
    assert _python(script, env).strip().endswith("ok")
