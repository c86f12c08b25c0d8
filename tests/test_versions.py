"""``llmprune --version``: versions and which kernels can run, as bug reports and RESULTS.md quote them."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers

import llmprune
from llmprune import versions
from llmprune.cli import main

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _info(**changes) -> dict:
    """A fixed versions() result, so describe() is checked independently of this machine."""
    info = {"llmprune": "0.1.0", "llmprune_path": "/site-packages/llmprune", "python": "3.12.3",
            "platform": "Linux x86_64", "torch": "2.11.0+cu130", "transformers": "5.17.0", "lm-eval": None,
            "numba": "0.61.0", "triton": "3.6.0",
            "cuda": {"available": True, "torch_cuda": "13.0", "devices": ["NVIDIA H200"], "cusparselt": True},
            "numba_kernel": {"usable": True, "reason": None}, "triton_kernel": {"usable": True, "reason": None}}
    info.update(changes)
    return info


def test_versions_reports_this_installation() -> None:
    info = versions.versions()
    json.dumps(info)  # JSON-ready, for benchmark records
    assert info["llmprune"] == llmprune.__version__
    assert info["torch"] == torch.__version__ and info["transformers"] == transformers.__version__
    assert info["cuda"]["available"] == torch.cuda.is_available()
    assert info["cuda"]["torch_cuda"] == torch.version.cuda
    assert info["llmprune_path"].endswith("llmprune")
    for kernel in ("numba_kernel", "triton_kernel"):
        assert info[kernel]["usable"] == (info[kernel]["reason"] is None)


def test_cli_version_prints_and_exits_zero(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"llmprune {llmprune.__version__} (")
    assert f"torch {torch.__version__}" in out and f"transformers {transformers.__version__}" in out
    assert "lm-eval " in out and "numba " in out and "triton " in out and "CUDA" in out


def test_describe_on_a_gpu_machine() -> None:
    text = versions.describe(_info())
    assert text.splitlines() == [
        "llmprune 0.1.0 (/site-packages/llmprune)",
        "python 3.12.3, Linux x86_64",
        "torch 2.11.0+cu130",
        "transformers 5.17.0",
        'lm-eval not installed (--tasks needs it: pip install "llmprune[eval]")',
        "numba 0.61.0 (CPU 2:4 kernel): usable",
        "triton 3.6.0 (CUDA 2:4 decode kernel): usable",
        "CUDA 13.0: usable on NVIDIA H200; cuSPARSELt available",
    ]


def test_describe_says_why_cuda_is_not_usable() -> None:
    cpu_build = versions.describe(_info(torch="2.13.0+cpu", cuda={"available": False, "torch_cuda": None,
                                                                   "devices": [], "cusparselt": False}))
    assert cpu_build.splitlines()[-1] == "CUDA: not usable: torch 2.13.0+cpu is a CPU build"
    no_device = versions.describe(_info(cuda={"available": False, "torch_cuda": "12.8", "devices": [],
                                              "cusparselt": False}))
    assert no_device.splitlines()[-1] == "CUDA 12.8: not usable: no CUDA device visible"


def test_missing_or_broken_numba_is_not_usable(monkeypatch) -> None:
    real = versions._installed
    monkeypatch.setattr(versions, "_installed", lambda name: None if name == "numba" else real(name))
    info = versions.versions()
    assert info["numba"] is None and not info["numba_kernel"]["usable"]
    assert "pip install numba" in info["numba_kernel"]["reason"]
    assert "numba not installed (CPU 2:4 kernel): not usable: numba is not installed" in versions.describe(info)
    # Installed but failing at import (e.g. built against another numpy) is not usable either.
    assert versions._importable("llmprune_no_such_module").startswith("ModuleNotFoundError")
    assert versions._importable("json") is None


@needs_triton
def test_triton_is_usable_without_cuda_only_under_the_interpreter(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = versions.versions()["triton_kernel"]
    assert not kernel["usable"] and "no CUDA device" in kernel["reason"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert versions.versions()["triton_kernel"] == {"usable": True, "reason": None}
