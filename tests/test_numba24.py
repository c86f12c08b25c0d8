"""The numba CPU 2:4 kernel: its layout against a direct per-group reading of the weight, and its products
against the dense masked matmul, on both of its paths (fused for a few rows of x, expanded for more)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.kernels import numba24
from llmprune.patterns import NM
from llmprune.sparse_linear import SparseLinear

pytest.importorskip("numba", reason="numba is not installed; the CPU 2:4 kernel needs it")


def random_24(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    return weight * NM(2, 4).keep_mask(weight.abs())


def reference_layout(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group by group into the panels: the non-zeros in order, padded with the lowest free positions when
    fewer than two; groups past in/4 up to a multiple of 16 are padding (code 255, values 0)."""
    rows, columns = weight.shape
    chunks = -(-columns // 64)
    values = torch.zeros(rows // 4, chunks, 4, 2, 16)
    meta = torch.full((rows // 4, chunks, 4, 16), 255, dtype=torch.uint8)
    for r in range(rows):
        for g in range(columns // 4):
            group = weight[r, 4 * g:4 * g + 4].tolist()
            kept = [p for p in range(4) if group[p] != 0]
            kept += [p for p in range(4) if p not in kept][:2 - len(kept)]
            a, b = sorted(kept)
            at = (r // 4, g // 16, r % 4)
            values[at][0, g % 16], values[at][1, g % 16] = group[a], group[b]
            meta[at][g % 16] = a | b << 2
    return values, meta


def test_layout_matches_a_direct_reading_and_round_trips() -> None:
    weight = random_24(8, 136)  # 34 groups: two full chunks of 16 and a padded one
    weight[0, :4] = 0  # no kept value
    weight[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # one kept value, in the last position
    weight[2, 8:12] = torch.tensor([-0.0, 2.0, 0.0, 0.0])
    values, meta = numba24.to_layout(weight)
    expected_values, expected_meta = reference_layout(weight)
    assert torch.equal(values, expected_values) and torch.equal(meta, expected_meta)
    assert values.shape == (2, 3, 4, 2, 16) and meta.dtype == torch.uint8
    assert torch.equal(numba24.from_layout(values, meta), weight)
    with pytest.raises(LLMPruneError, match="2:4"):
        numba24.to_layout(torch.ones(4, 8))
    with pytest.raises(LLMPruneError, match="divisible by 4"):
        numba24.to_layout(random_24(6, 8))


@pytest.mark.parametrize("rows, columns, batch", [
    (4, 16, (1,)),          # one block of four rows, one chunk mostly padding
    (12, 256, (3,)),        # whole chunks
    (28, 100, (2, 4)),      # several rows of x, 3-D input, a padded chunk
    (64, 128, (numba24.MAX_FUSED_ROWS,)),      # the last size the fused kernel takes
    (64, 128, (numba24.MAX_FUSED_ROWS + 1,)),  # expanded weight and a dense GEMM
    (1024, 1024, (2,)),     # large enough to run on all threads
])
@pytest.mark.parametrize("bias", [False, True])
def test_products_match_the_dense_masked_matmul(rows, columns, batch, bias) -> None:
    weight = random_24(rows, columns, seed=rows)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*batch, columns, generator=generator)
    b = torch.randn(rows, generator=generator) if bias else None
    y = numba24.linear(x, *numba24.to_layout(weight), b)
    assert y.shape == (*batch, rows)
    torch.testing.assert_close(y, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


def test_a_large_layer_runs_more_rows_fused(monkeypatch) -> None:
    """Prefill rows run fused until expanding the weight pays, later for a weight whose expansion leaves
    the cache; the fast path (``SparseLinear``'s bound call) and ``linear`` draw the line at the same row."""
    assert [numba24.fused_rows(*shape) for shape in ((576, 576), (1536, 576), (2048, 2048), (5632, 2048),
                                                     (4096, 4096), (11008, 4096))] == [16, 16, 64, 64, 64, 64]
    assert [numba24.fused_rows(*shape, torch.bfloat16) for shape in ((2048, 2048), (5632, 2048), (4096, 4096))] == [
        16, 44, 64]  # bfloat16 GEMMs are faster: expanding pays sooner
    weight = random_24(512, 2304, seed=3)  # 4.5 MiB in float32: 18 rows fused
    layer = SparseLinear(weight, backend="numba", name="large")
    expanded = []
    expand = numba24.expand
    monkeypatch.setattr(numba24, "expand", lambda *a: expanded.append(1) or expand(*a))
    for rows in (17, 18, 19):
        x = torch.randn(rows, 2304, generator=torch.Generator().manual_seed(rows))
        for run in (layer, lambda x: numba24.linear(x, layer.kernel, layer.meta)):
            expanded.clear()
            torch.testing.assert_close(run(x), x @ weight.T, rtol=1e-5, atol=1e-4)
            assert len(expanded) == (rows > 18), rows


def test_wrong_input_size_is_refused() -> None:
    values, meta = numba24.to_layout(random_24(8, 136))
    for columns in (132, 140, 200):  # inside the padded chunk, just past the weight, far past it
        for rows in (1, numba24.MAX_FUSED_ROWS + 1):  # the fused kernel and the expanded GEMM
            with pytest.raises((LLMPruneError, RuntimeError), match="input features|shapes cannot be multiplied"):
                numba24.linear(torch.randn(rows, columns), values, meta)


def test_other_devices_are_refused() -> None:
    values, meta = numba24.to_layout(random_24(8, 64))
    with pytest.raises(LLMPruneError, match="runs on CPU"):
        numba24.linear(torch.randn(1, 64, device="meta"), values, meta)


def test_nan_in_a_kept_input_reaches_the_output() -> None:
    weight = random_24(8, 16)
    x = torch.randn(1, 16)
    x[0, 5] = float("nan")
    y = numba24.linear(x, *numba24.to_layout(weight))
    uses_it = weight[:, 5] != 0
    assert y[0, uses_it].isnan().all() and not y[0, ~uses_it].isnan().any()


def test_sparse_linear_numba_backend_and_its_fallbacks() -> None:
    weight = random_24(12, 64)
    bias = torch.randn(12)
    x = torch.randn(2, 3, 64)
    module = SparseLinear(weight, bias, backend="numba")
    assert module.backend == "numba" and module.fallback_reason is None
    assert torch.equal(module.weight, weight)
    torch.testing.assert_close(module(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    hybrid = weight.clone()
    hybrid[:, 16:32] = torch.randn(12, 16)  # a dense block of columns
    split = SparseLinear(hybrid, bias, backend="numba", dense_ranges=((16, 32),))
    assert split.backend == "numba" and torch.equal(split.weight, hybrid)
    torch.testing.assert_close(split(x), F.linear(x, hybrid, bias), rtol=1e-5, atol=1e-4)
    half = SparseLinear(weight.half(), backend="numba")
    assert half.backend == "dense" and "float32 or bfloat16" in half.fallback_reason
    assert SparseLinear(weight.bfloat16(), backend="numba").backend == "numba"
    odd = SparseLinear(weight[:10], backend="numba")
    assert odd.backend == "dense" and "multiple of 4" in odd.fallback_reason
    assert numba24.unavailable(weight) is None


@pytest.mark.parametrize("bias", [False, True])
def test_a_bfloat16_weight_keeps_its_bits_and_computes_as_the_float32_kernel(bias) -> None:
    """A bfloat16 model's 2:4 weight stays bfloat16 in the layout (5 bytes per group of 4 against dense
    bfloat16's 8). Decode rows give the float32 kernel's result on the same values, bit for bit (they are
    widened exactly in registers); prefill rows the dense bfloat16 model's GEMM, bit for bit."""
    weight = random_24(64, 200, seed=4).bfloat16()  # 50 groups: a padded chunk
    b = torch.randn(64, generator=torch.Generator().manual_seed(2)).bfloat16() if bias else None
    values, meta = numba24.to_layout(weight)
    assert values.dtype == torch.bfloat16 and values.nbytes + meta.nbytes == 64 * 64 * 5
    assert torch.equal(numba24.from_layout(values, meta), weight)
    single = numba24.to_layout(weight.float())
    module = SparseLinear(weight, b, backend="numba")
    assert module.backend == "numba" and module.kernel.dtype == torch.bfloat16 and torch.equal(module.weight, weight)
    for rows in (1, 3, numba24.MAX_FUSED_ROWS, numba24.MAX_FUSED_ROWS + 1):
        x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(rows)).bfloat16()
        with torch.inference_mode():
            for y in (numba24.linear(x, values, meta, b), module(x)):
                if rows > numba24.MAX_FUSED_ROWS:
                    expected = F.linear(x, weight, b)
                else:
                    expected = numba24.linear(x.float(), *single, None if b is None else b.float()).bfloat16()
                assert y.dtype == torch.bfloat16 and torch.equal(y, expected), rows
            # a float32 input (the model cast to float32 after loading): the float32 kernel's result
            assert torch.equal(numba24.linear(x.float(), values, meta), numba24.linear(x.float(), *single))


def test_expanding_into_bfloat16_rounds_as_torch_does() -> None:
    """A float32 layout expanded into bfloat16 (prefill of a model cast to bfloat16 after loading) equals
    ``weight.to(bfloat16)``: ties to even, overflow to infinity, subnormals, NaN kept NaN."""
    one = 0x3F800000
    bits = [one + 0x8000, one + 0x18000, one + 0x7FFF, one + 0x8001, 0x7F7FFFFF, 0x00400000, 0x807FFFFF, 0x7FC00000,
            0x7F800001, one]  # tie to even (down), tie to even (up), below and above a tie, overflow, subnormals, NaNs
    kept = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    weight = torch.zeros(4, 40)
    weight[:, 0::2] = kept.repeat(8).reshape(4, 20)  # two kept per group of 4, in positions 0 and 2
    expanded = numba24.from_layout(*numba24.to_layout(weight), torch.bfloat16)
    expected = weight.to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(expanded.isnan(), nan) and nan.sum() == 16
    assert torch.equal(expanded[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_a_bfloat16_checkpoint_runs_the_kernel_as_stored(tmp_path) -> None:
    """Most checkpoints are bfloat16, and ``llmprune.load`` keeps their dtype: their 2:4 linears must run the
    kernel (they fell back to dense before), with logits as close to the dense path's as bfloat16 allows."""
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    model = llmprune.prune(tiny_model("llama"), method="magnitude", pattern="2:4", calib_tokens=tokens, device="cpu",
                           progress=False)
    llmprune.save(model.to(torch.bfloat16), tmp_path / "out")
    sparse = llmprune.load(tmp_path / "out", backend="numba")
    dense = llmprune.load(tmp_path / "out", backend="dense")
    packed = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert packed and all(m.backend == "numba" and m.kernel.dtype == torch.bfloat16 for m in packed)
    assert not llmprune.state(sparse).fallbacks
    with torch.inference_mode():
        for ids in (tokens[:, :1], tokens):  # decode-sized (fused) and prefill-sized (expanded) calls
            got, expected = sparse(ids).logits, dense(ids).logits
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_in_tiles_equals_one_gemm(monkeypatch, dtype) -> None:
    """Prefill expands the weight a tile of rows at a time and multiplies each tile into its rows of yᵀ;
    with tiles of 2 blocks (8 tiles, the last one short) the result is ``F.linear``'s, bit for bit."""
    monkeypatch.setattr(numba24, "TILE_BYTES", 4 * 200 * 2 * dtype.itemsize)
    weight = random_24(60, 200, seed=6).to(dtype)
    bias = torch.randn(60, generator=torch.Generator().manual_seed(3)).to(dtype)
    values, meta = numba24.to_layout(weight)
    x = torch.randn(2, 9, 200, generator=torch.Generator().manual_seed(4)).to(dtype)  # 18 rows: expanded
    for b in (None, bias):
        y = numba24.linear(x, values, meta, b)
        assert y.shape == (2, 9, 60) and y.is_contiguous() and torch.equal(y, F.linear(x, weight, b))
    with pytest.raises(LLMPruneError, match="x has 204 input features; the 2:4 weight takes 200"):
        numba24.linear(torch.randn(18, 204).to(dtype), values, meta)
