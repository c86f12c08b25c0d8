"""The Triton kernels compiled for a Hopper GPU (sm_90) on this CPU-only machine: the interpreter that checks
their results (test_triton24*.py) accepts code the GPU compiler refuses (a plain global read inside a
kernel, for one), so every block configuration ``_triton_jit.blocks`` picks, and the prefill expand
kernels, are compiled here to GPU machine code, and must not spill registers to local memory."""
from __future__ import annotations

import inspect
import itertools
import re
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SCALARS = {"m_rows", "out_features", "half", "chunks", "x_features", "in_features", "stride_x", "stride_y"}
POINTERS = {"gemm24": {"values_ptr": None, "meta_ptr": "*i32"}, "gemm24q4": {"values_ptr": "*u8", "meta_ptr": "*fp32"}}
POINTERS.update(expand24=POINTERS["gemm24"], expand24q4=POINTERS["gemm24q4"])


def hopper_target():
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")
    return GPUTarget("cuda", 90, 32)


def compiled(kernel: str, dtype: torch.dtype, shape, lanes: int = 1):
    from llmprune.kernels import _triton_jit

    fn = getattr(_triton_jit, kernel)
    x = f"*{TYPES[dtype]}"
    pointers = {"x_ptr": x, "bias_ptr": x, "y_ptr": x, "out_ptr": x, **{k: v or x for k, v in POINTERS[kernel].items()}}
    signature = {name: pointers.get(name) or ("i32" if name in SCALARS else "constexpr")
                 for name in inspect.signature(fn.fn).parameters}
    constants = {"HAS_BIAS": True, "BLOCK_M": shape.block_m, "BLOCK_N": shape.block_n, "STEPS": shape.steps,
                 "USE_DOT": shape.use_dot}
    if kernel.startswith("expand"):
        constants = {"BLOCK_N": _triton_jit.EXPAND_ROWS}
    if kernel.endswith("q4"):
        constants.update(PAD=15, LANES=lanes)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=hopper_target(), options={"num_warps": shape.num_warps})


@pytest.mark.parametrize("kernel", ["gemm24", "gemm24q4", "expand24", "expand24q4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_every_block_configuration_compiles_for_hopper_without_spills(kernel: str, dtype: torch.dtype,
                                                                      tmp_path: Path) -> None:
    from llmprune.kernels._triton_jit import blocks

    launch = "2:4+int4" if kernel.endswith("q4") else "2:4"
    configurations = sorted(set(blocks(m, dtype, launch) for m in (1, 2, 4, 5, 8, 16, 64, 4096)))
    assert any(shape.use_dot for shape in configurations) == (dtype != torch.float32)  # tensor cores: 16-bit x only
    if kernel.startswith("expand"):  # one launch shape (prefill)
        configurations = configurations[:1]
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    # INT4 grids: one (scale, offset) per 128 columns (its own code path), or one per group of 4
    for shape, lanes in itertools.product(configurations, (1, 32) if kernel.endswith("q4") else (1,)):
        binary = compiled(kernel, dtype, shape, lanes).asm["cubin"]
        assert binary, shape
        if cuobjdump.exists():
            path = tmp_path / f"{kernel}.cubin"
            path.write_bytes(binary)
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True,
                                   text=True, check=True).stdout
            assert re.search(r"LOCAL:0\b", usage), f"{kernel} {shape} spills: {usage}"
