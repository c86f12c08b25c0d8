"""The numba CPU 2:4 + INT4 kernel: its layout byte for byte and its exact round trip to
``Int24.dequantize()``, its products against ``x @ dequantize().T`` on both paths (fused for a few rows
of x, expanded for more) and every grid granularity, and its refusals; plus the thread pool both numba
kernels share."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_int24

from llmprune.errors import LLMPruneError
from llmprune.kernels import numba24, numba24q4

pytest.importorskip("numba", reason="numba is not installed; the CPU 2:4 + INT4 kernel needs it")


@pytest.fixture(autouse=True)
def every_call_uses_all_threads(monkeypatch) -> None:
    """Helper threads for every call, whatever its size or timings, so that the small weights here run
    the claim loop on all threads."""
    monkeypatch.setattr(numba24, "MIN_HELPED_WORK", 0)
    monkeypatch.setattr(numba24, "_use_helpers", lambda record: True)

_USE_HELPERS = numba24._use_helpers  # before the fixture below replaces it


@pytest.mark.parametrize("rows, columns, group_size, lanes", [
    (8, 1024, 128, 1),   # whole chunks, one (scale, offset) per chunk row
    (8, 576, 128, 1),    # a half-padded last chunk
    (12, 384, 64, 2),    # one per 64 columns
    (4, 100, 100, 1),    # group_size = in: one per row
    (8, 136, 4, 32),     # one per group of 4
    (8, 200, 12, 32),    # a grid that is no multiple of 64
    (4, 4, 4, 1),        # a single group
])
@pytest.mark.parametrize("symmetric", [False, True])
def test_layout_round_trips_exactly(rows, columns, group_size, lanes, symmetric) -> None:
    q = random_int24(rows, columns, group_size, seed=columns, symmetric=symmetric)
    assert numba24q4.unavailable(q) is None
    values, meta = numba24q4.to_layout(q)
    chunks = -(-columns // 128)
    assert values.shape == (rows // 4, chunks, 4, 48) and values.dtype == torch.uint8
    assert meta.shape == (rows // 4, chunks, 4, 2, lanes) and meta.dtype == torch.float32
    assert torch.equal(numba24q4.from_layout(values, meta), q.dequantize())


def test_layout_byte_for_byte() -> None:
    q = random_int24(4, 132, 128)  # 33 groups: one full chunk and one with a single real group
    q.codes[1, :4] = torch.tensor([3, 12, 15, 0], dtype=torch.uint8)  # groups 0 and 1 of row 1
    q.positions[1, :4] = torch.tensor([1, 3, 0, 2], dtype=torch.uint8)
    q.codes[1, 32:34] = torch.tensor([7, 9], dtype=torch.uint8)  # group 16
    q.positions[1, 32:34] = torch.tensor([2, 3], dtype=torch.uint8)
    values, meta = numba24q4.to_layout(q)
    panel = values[0, 0, 1]  # block 0, chunk 0, row 1
    assert panel[0] == (1 | 3 << 2) | (2 | 3 << 2) << 4  # groups 0 and 16
    assert panel[1] & 15 == 0 | 2 << 2
    assert panel[16] == 3 | 12 << 4 and panel[17] == 15 | 0 << 4 and panel[16 + 16] == 7 | 9 << 4
    tail = values[0, 1, 1]
    assert tail[0] & 15 != numba24q4.PAD and tail[0] >> 4 == numba24q4.PAD
    assert (tail[1:16] == numba24q4.PAD | numba24q4.PAD << 4).all() and (tail[17:] == 0).all()
    scale, zero = q.scales[1].float(), q.zeros[1].float()
    assert torch.equal(meta[0, 0, 1, :, 0], torch.stack([scale[0], -zero[0] * scale[0]]))
    assert torch.equal(meta[0, 1, 1, :, 0], torch.stack([scale[1], -zero[1] * scale[1]]))


@pytest.mark.parametrize("rows, columns, group_size, batch", [
    (4, 16, 4, (1,)),        # one block of four rows, one chunk mostly padding, a scale per group
    (12, 256, 128, (3,)),    # whole chunks
    (28, 100, 100, (2, 4)),  # several rows of x, 3-D input, group_size = in
    (20, 392, 64, (1,)),     # two scales per chunk, a padded chunk
    (64, 128, 128, (numba24.MAX_FUSED_ROWS,)),      # the last size the fused kernel takes
    (64, 128, 128, (numba24.MAX_FUSED_ROWS + 1,)),  # expanded weight and a dense GEMM
    (1024, 1024, 128, (2,)),  # many claims per thread
])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_products_match_the_dequantized_matmul(rows, columns, group_size, batch, bias, symmetric) -> None:
    q = random_int24(rows, columns, group_size, seed=rows, symmetric=symmetric)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*batch, columns, generator=generator)
    b = torch.randn(rows, generator=generator) if bias else None
    y = numba24q4.linear(x, *numba24q4.to_layout(q), b)
    assert y.shape == (*batch, rows)
    torch.testing.assert_close(y, F.linear(x, q.dequantize(), b), rtol=1e-5, atol=1e-4)


def test_nan_in_a_kept_input_reaches_only_the_rows_that_store_it() -> None:
    q = random_int24(8, 16, 16)
    x = torch.randn(1, 16)
    x[0, 5] = float("nan")
    y = numba24q4.linear(x, *numba24q4.to_layout(q))
    stores_it = (q.columns() == 5).any(1)  # stored, even where its value is 0
    assert stores_it.any() and not stores_it.all()
    assert y[0, stores_it].isnan().all() and not y[0, ~stores_it].isnan().any()


def test_wrong_inputs_are_refused() -> None:
    values, meta = numba24q4.to_layout(random_int24(8, 136, 128))
    for columns in (132, 140, 264):  # inside the padded chunk, just past the weight, far past it
        for rows in (1, numba24.MAX_FUSED_ROWS + 1):  # the fused kernel and the expanded GEMM
            with pytest.raises((LLMPruneError, RuntimeError), match="input features|shapes cannot be multiplied"):
                numba24q4.linear(torch.randn(rows, columns), values, meta)
    with pytest.raises(LLMPruneError, match="runs on CPU"):
        numba24q4.linear(torch.randn(1, 136, device="meta"), values, meta)
    with pytest.raises(LLMPruneError, match="float32"):
        numba24q4.linear(torch.randn(1, 136, dtype=torch.float64), values, meta)


def test_unavailable_and_to_layout_say_why() -> None:
    q = random_int24(8, 64, 32)
    assert "4-bit" in numba24q4.unavailable(q._replace(bits=3))
    assert "multiple of 4" in numba24q4.unavailable(random_int24(6, 64, 32))
    assert "group_size" in numba24q4.unavailable(q._replace(group_size=30))
    assert "grid" in numba24q4.unavailable(q._replace(group_size=64))  # scales of a 32-column grid
    assert "zero points" in numba24q4.unavailable(q._replace(zeros=q.zeros + 0.5))
    assert "zero points" in numba24q4.unavailable(q._replace(zeros=torch.full_like(q.zeros, 5000)))
    assert "finite" in numba24q4.unavailable(q._replace(scales=q.scales.clone().fill_(float("inf"))))
    assert "runs on CPU" in numba24q4.unavailable(q._replace(codes=q.codes.to("meta")))
    with pytest.raises(LLMPruneError, match="codes 0-15"):
        numba24q4.to_layout(q._replace(codes=q.codes | 16))
    with pytest.raises(LLMPruneError, match="ascending"):
        numba24q4.to_layout(q._replace(positions=q.positions.flip(1)))
    with pytest.raises(LLMPruneError, match="up_proj: .* divisible by 4; it has 6"):
        numba24q4.to_layout(random_int24(6, 64, 32), "layers.0.mlp.up_proj")


@pytest.mark.parametrize("kernel", ["numba24", "numba24q4"])
def test_threads_change_neither_results_nor_torch_settings(kernel) -> None:
    """Rows are split between threads, never a row's sum, so results are bit for bit the same on any
    number of threads; and the kernels leave torch's thread count alone (numba's OpenMP layer did not)."""
    if kernel == "numba24":
        module = numba24
        weight = random_int24(512, 1024, 128).dequantize()
        layout = numba24.to_layout(weight)
    else:
        module = numba24q4
        layout = numba24q4.to_layout(random_int24(512, 1024, 128))
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(2))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = module.linear(x, *layout)
        dense = module.from_layout(*layout)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert torch.equal(module.linear(x, *layout), alone) and torch.equal(module.from_layout(*layout), dense)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_helpers_are_used_where_they_measured_faster() -> None:
    record = [1, None, None]
    assert not _USE_HELPERS(record)  # alone first
    record = [2, 1.0, None]
    assert _USE_HELPERS(record)  # then helped
    for calls in range(3, 3 + numba24.EXPLORE):
        explore = calls % numba24.EXPLORE == 0
        assert _USE_HELPERS([calls, 1.0, 0.5]) != explore and _USE_HELPERS([calls, 0.5, 1.0]) == explore


def test_a_helper_failure_reaches_the_caller() -> None:
    def kernel(state, caller: bool) -> bool:
        if not caller:
            raise RuntimeError("helper failed")
        return False  # the caller claims nothing and waits for the helper

    with pytest.raises(RuntimeError, match="helper failed"):
        numba24._helped(kernel, 64, 2, ())


def test_the_caller_does_what_a_descheduled_helper_holds() -> None:
    """A helper took runs 0 and 1, finished run 1 (into the spare output) and was descheduled in run 0:
    the GEMV's caller copies run 1 and computes run 0 itself; the expansion's caller reports it pending."""
    q = random_int24(64, 256, 128)
    values, meta = (t.numpy() for t in numba24q4.to_layout(q))
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3))
    kernels = numba24q4._compiled()
    xs = kernels.split(x.numpy(), values, meta)
    expected = F.linear(x, q.dequantize())

    def taken() -> np.ndarray:
        state = numba24._state(16, 2)  # one block (4 rows) per run
        state[numba24.NEXT] = 2
        state[numba24.FLAGS + 1] = numba24.HELPED
        return state

    y, spare = torch.full_like(expected, float("nan")), torch.full_like(expected, float("nan"))
    spare[:, 4:8] = expected[:, 4:8]
    assert kernels.gemm(taken(), values, meta, xs, y.numpy(), spare.numpy(), True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    dense = torch.full((64, 256), float("nan"))
    assert not kernels.expand(taken(), values, meta, dense.numpy(), True)
    assert torch.equal(dense[8:], q.dequantize()[8:]) and dense[:8].isnan().all()
