"""SparseGPT against a direct float64 OBS reference, plus its pattern, sharing and damping contracts."""
from __future__ import annotations

import pytest
import torch

from helpers import COLUMNS, PERCDAMP, correlated_inputs, random_weight, reference_obs, stats_for

from llmprune.state import state
from llmprune.errors import LLMPruneError
from llmprune.patterns import NM, Unstructured
from llmprune.pruners import PRUNERS, make_pruner, sparsegpt
from llmprune.pruners.quantizer import Quantizer
from llmprune.pruners.sparsegpt import SparseGPT
from llmprune.pruners.wanda import Wanda
from llmprune.stats import HESSIAN, SQ_NORM, InputStats



@pytest.mark.parametrize("pattern,blocksize,reselect_every", [
    (Unstructured(0.5), COLUMNS, None), (Unstructured(0.7), COLUMNS, None),  # one mask per row up front
    (Unstructured(0.5), 16, 16), (Unstructured(0.7), 48, 48),  # masks re-chosen per block
    (NM(2, 4), 16, None), (NM(4, 8), 16, None),
], ids=str)
def test_matches_float64_reference(pattern, blocksize, reselect_every) -> None:
    inputs, weight = correlated_inputs(), random_weight()
    stats = stats_for(inputs, torch.float64)
    hessian = stats.hessian.clone()
    off_diagonal = hessian - torch.diag(hessian.diagonal())
    assert off_diagonal.abs().sum() > hessian.diagonal().sum()  # really not diagonal
    result = SparseGPT(blocksize=blocksize, hessian_dtype=torch.float64).prune(weight.double(), stats, pattern)
    expected, loss = reference_obs(weight, hessian, pattern, reselect_every)
    assert torch.equal(stats.hessian, hessian)  # the shared statistics are untouched
    assert torch.equal(result.weight == 0, expected == 0)
    assert torch.allclose(result.weight, expected, atol=1e-8, rtol=0)
    assert result.info["obs_loss"] == pytest.approx(loss, rel=1e-5)
    assert result.info["damp_retries"] == 0 and result.info["damping"] == PERCDAMP


def test_obs_loss_is_the_damped_reconstruction_error() -> None:
    """Σ OBS step losses equals ½·tr(δ (H + λI) δᵀ) for the final δ = W − Ŵ (quadratic, exact)."""
    inputs, weight = correlated_inputs(), random_weight()
    stats = stats_for(inputs, torch.float64)
    result = SparseGPT(blocksize=32, hessian_dtype="float64").prune(weight.double(), stats, NM(2, 4))
    damped = stats.hessian.clone()
    damped.diagonal().add_(PERCDAMP * damped.diagonal().mean())
    delta = weight.double() - result.weight
    assert result.info["obs_loss"] == pytest.approx(float((delta @ damped * delta).sum() / 2), rel=1e-5)


@pytest.mark.parametrize("blocksize", [1, 16, 48, 100])
@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7)], ids=str)
def test_blocked_unstructured_prunes_exactly_the_row_budget(pattern, blocksize) -> None:
    inputs, weight = correlated_inputs(), random_weight()
    result = SparseGPT(blocksize=blocksize).prune(weight, stats_for(inputs), pattern)
    assert pattern.violations(result.weight) == 0
    assert ((result.weight == 0).sum(-1) == pattern.pruned_per_row(COLUMNS)).all()


def test_unstructured_sparsity_follows_the_inputs_across_blocks() -> None:
    """Blocks of weak input channels give up more weights than blocks of strong ones."""
    inputs = correlated_inputs() * torch.cat([torch.full((64,), 0.1), torch.full((64,), 10.0)]).double()
    result = SparseGPT(blocksize=32).prune(random_weight(), stats_for(inputs), Unstructured(0.5))
    weak, strong = (result.weight[:, :64] == 0).float().mean(), (result.weight[:, 64:] == 0).float().mean()
    assert weak > 0.8 and strong < 0.2  # a fixed 50% quota per block would give 0.5 and 0.5


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(torch.linalg.norm(inputs.float() @ (weight - pruned).T))


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=str)
def test_obs_update_beats_plain_masking_and_wanda(pattern) -> None:
    inputs, weight = correlated_inputs(decay=0.01), random_weight()
    stats = stats_for(inputs, needs=frozenset({SQ_NORM, HESSIAN}))
    sparsegpt = SparseGPT(blocksize=32).prune(weight.clone(), stats, pattern).weight
    same_mask = weight * (sparsegpt != 0)
    wanda = Wanda().prune(weight.clone(), stats, pattern).weight
    error = reconstruction_error(weight, sparsegpt, inputs)
    assert error < 0.85 * reconstruction_error(weight, same_mask, inputs)
    assert error < 0.85 * reconstruction_error(weight, wanda, inputs)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8)], ids=str)
def test_masks_meet_pattern_without_negative_zeros(pattern) -> None:
    inputs = correlated_inputs()
    inputs[:, 5] = 0.0  # a dead input channel
    weight = -random_weight().abs()  # all negative: pruned entries would be −0.0 if written carelessly
    weight[0, 7] = -0.0  # and a −0.0 that is already there
    result = SparseGPT(blocksize=32).prune(weight, stats_for(inputs), pattern)
    assert pattern.violations(result.weight) == 0
    assert result.weight.dtype == torch.float32
    assert not torch.signbit(result.weight[result.weight == 0]).any()
    assert (result.weight[:, 5] == 0).all() and result.info["dead_inputs"] == 1


def test_shared_hessian_is_factorised_once() -> None:
    inputs = correlated_inputs()
    weights = [random_weight(rows, seed=s) for s, rows in enumerate([64, 32, 32])]  # q, k, v (GQA)
    pruner = SparseGPT(blocksize=32)
    calls = []
    factorise = pruner._factorise
    pruner._factorise = lambda *a: calls.append(1) or factorise(*a)
    shared = stats_for(inputs)
    together = [pruner.prune(w.clone(), shared, NM(2, 4)) for w in weights]
    assert len(calls) == 1
    assert [r.info["factor_reused"] for r in together] == [False, True, True]
    separate = [SparseGPT(blocksize=32).prune(w.clone(), stats_for(inputs), NM(2, 4)) for w in weights]
    for a, b in zip(together, separate):
        assert torch.equal(a.weight, b.weight)
    # a new layer's statistics (a new object) and updated statistics both get a fresh factor
    pruner.prune(weights[0].clone(), stats_for(correlated_inputs(seed=7)), NM(2, 4))
    assert len(calls) == 2
    shared.update(correlated_inputs(seed=8)[:64])
    refreshed = pruner.prune(weights[0].clone(), shared, NM(2, 4))
    assert len(calls) == 3 and not refreshed.info["factor_reused"]
    assert not torch.equal(refreshed.weight, together[0].weight)


def nearly_psd_stats(negative_eigenvalue: float) -> InputStats:
    """Float64 statistics whose H has one eigenvalue of ``negative_eigenvalue`` × mean diag(H)."""
    inputs = correlated_inputs(columns=32, tokens=16)  # rank 16 < 32: H is singular
    stats = stats_for(inputs, torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(stats.hessian)
    shift = negative_eigenvalue * stats.hessian.diagonal().mean() - eigenvalues[0]
    stats.hessian.add_(shift * torch.outer(vectors[:, 0], vectors[:, 0]))
    return stats


def test_cholesky_failure_raises_damping_and_reports_it() -> None:
    # eigenvalue −3e-8·mean: damping 1e-10, 1e-9 and 1e-8 fail, 1e-7 succeeds
    stats = nearly_psd_stats(-3e-8)
    result = SparseGPT(percdamp=1e-10, hessian_dtype=torch.float64).prune(random_weight(8, 32).double(), stats, NM(2, 4))
    assert result.info["damp_retries"] == 3
    assert result.info["damping"] == pytest.approx(1e-7)
    assert NM(2, 4).violations(result.weight) == 0


def test_cholesky_failure_after_all_retries_is_an_error() -> None:
    stats = nearly_psd_stats(-1.0)  # not fixable by damping up to 1e-6 × mean diag
    with pytest.raises(LLMPruneError, match="not positive definite.*--percdamp"):
        SparseGPT(percdamp=1e-10).prune(random_weight(8, 32), stats, NM(2, 4))
    stats.hessian[0, 0] = float("nan")
    with pytest.raises(LLMPruneError, match="NaN or Inf"):
        SparseGPT().prune(random_weight(8, 32), stats, NM(2, 4))


def test_rank_deficient_inputs_work_with_default_damping() -> None:
    inputs = correlated_inputs(tokens=512)
    inputs[:, 64:] = inputs[:, :64]  # every channel duplicated: H has rank 64 of 128
    result = SparseGPT().prune(random_weight(), stats_for(inputs), Unstructured(0.5))
    assert torch.isfinite(result.weight).all() and Unstructured(0.5).violations(result.weight) == 0


def test_arguments_are_validated() -> None:
    assert PRUNERS["sparsegpt"] is SparseGPT
    assert make_pruner("sparsegpt", blocksize=64, percdamp=0.1).blocksize == 64
    assert SparseGPT(hessian_dtype="float64").hessian_dtype is torch.float64
    for bad in ({"blocksize": 0}, {"blocksize": 2.5}, {"percdamp": 0}, {"percdamp": -1.0},
                {"hessian_dtype": "bfloat16"}, {"hessian_dtype": torch.float16}):
        with pytest.raises(LLMPruneError, match="SparseGPT"):
            SparseGPT(**bad)
    with pytest.raises(LLMPruneError, match="multiple of M=4.*--blocksize 8"):
        SparseGPT(blocksize=10).prune(random_weight(), stats_for(correlated_inputs()), NM(2, 4))
    with pytest.raises(LLMPruneError, match="needs the Hessian"):
        SparseGPT().prune(random_weight(), None, NM(2, 4))


def test_pipeline_end_to_end_on_tiny_llama() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmprune.adapter import ModelAdapter
    from llmprune.pipeline import prune

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    prune(model, method="sparsegpt", pattern="2:4", calib_tokens=tokens, device="cpu", progress=False, blocksize=32)
    linears = ModelAdapter(model).all_linears()
    assert len(linears) == 14
    for linear in linears.values():
        assert NM(2, 4).violations(linear.weight.float()) == 0
    report = state(model).report
    assert len(report.layers) == 14
    assert all(entry.facts["damping"] == PERCDAMP and entry.facts["damp_retries"] == 0 for entry in report.layers)
    assert sum(entry.facts["factor_reused"] for entry in report.layers) == 2 * 3  # k, v and up in both layers
    assert report.recipe.options == {"blocksize": 32}


SWEEPS = {  # name: (pattern, quantizer, act_order, blocksize, hessian dtype, rows of the linears sharing the input)
    "2:4 stacked": (NM(2, 4), None, False, 32, torch.float32, [40, 24]),
    "4:8": (NM(4, 8), None, False, 16, torch.float32, [64]),
    "unstructured 0.6": (Unstructured(0.6), None, False, 48, torch.float32, [64]),
    "2:4 float64": (NM(2, 4), None, False, 16, torch.float64, [64]),
    "2:4 + w4 g32 asym": (NM(2, 4), Quantizer(4, 32, False), False, 16, torch.float32, [33, 31]),
    "2:4 + w4 act-order": (NM(2, 4), Quantizer(4, 16, True), True, 32, torch.float32, [64]),
    "unstructured + w4 float64": (Unstructured(0.5), Quantizer(4, 24, False), True, 16, torch.float64, [64]),
    "hybrid + w4": (NM(2, 4, ((12, 28),)), Quantizer(4, 8, False), False, 16, torch.float32, [64]),
    "gptq + w4": (None, Quantizer(4, 16, False, clip=True), True, 32, torch.float32, [64]),
}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_compiled_column_loop_gives_the_torch_loops_bits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the column loop runs compiled (numba); the torch loop runs elsewhere (GPU, no numba). Both must
    give the same weights, codes, grids and losses, bit for bit, in every mode of the sweep."""
    pytest.importorskip("numba")
    pattern, quantizer, act_order, blocksize, dtype, rows = SWEEPS[name]
    inputs = correlated_inputs()
    inputs[:, 5] = 0  # a dead input, zeroed for free
    stats = stats_for(inputs, dtype)
    weights = [random_weight(r, seed=s) for s, r in enumerate(rows)]
    for weight in weights:
        weight[:, :4] = 0  # decided before any update reaches them: four tied scores, the lower indices pruned
    results = {}
    for compiled in (False, True):
        monkeypatch.setattr(sparsegpt, "_numba_runs", lambda work, compiled=compiled: compiled)
        pruner = SparseGPT(blocksize=blocksize, hessian_dtype=dtype, act_order=act_order)
        if pattern is None:
            results[compiled] = [pruner.quantize(weights[0], stats, quantizer)]
        else:
            results[compiled] = pruner.prune_many(weights, stats, pattern, quantizer)
    for loop, compiled in zip(results[False], results[True]):
        assert torch.equal(loop.weight, compiled.weight)
        assert loop.info == compiled.info
        if quantizer is not None:
            for field in ("codes", "scales", "zeros"):
                assert torch.equal(getattr(loop.quantized, field), getattr(compiled.quantized, field))
        if pattern is not None:
            assert pattern.violations(compiled.weight) == 0


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(3, 8)], ids=str)
def test_compiled_n_m_selection_breaks_ties_and_ranks_nan_as_torch(pattern: NM) -> None:
    """With H = I (no updates, d = 1) the sweep keeps each group's largest w²: many exact ties (small integers)
    and NaN, where the mask must be torch's stable sort's (lower index pruned first, NaN ranked last). NaN only
    in the last group: its error would spread NaN to the columns after it, as in the torch loop."""
    pytest.importorskip("numba")
    from llmprune.kernels.numba24 import parallel
    from llmprune.pruners import _obs_numba

    generator = torch.Generator().manual_seed(0)
    block = torch.randint(-2, 3, (48, 32), generator=generator).float()
    last = block[:, -pattern.m:]
    last[torch.rand(last.shape, generator=generator) < 0.3] = float("nan")
    expected = pattern.keep_mask(block.square())
    keep, errors = torch.ones_like(block, dtype=torch.bool), torch.zeros_like(block)
    empty = torch.empty(0, 0)
    parallel(_obs_numba.sweep, 6, 1, block.numpy(), torch.eye(32).numpy(), torch.ones(32).numpy(), keep.numpy(),
             errors.numpy(), empty.to(torch.uint8).numpy(), empty.numpy(), empty.numpy(), torch.zeros(1).numpy(),
             0, 0, 32, pattern.n, pattern.m, 32, 0, False)
    assert torch.equal(keep, expected)


def test_an_unstructured_block_prunes_its_members_among_each_rows_lowest_scores() -> None:
    """The block mask from thresholds equals ranking every remaining column by (score, index) and pruning
    the block members ranked below the row's budget: ties in index order, budgets from 0 to all."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows, remaining = int(torch.randint(1, 12, (1,), generator=generator)), int(torch.randint(4, 80, (1,), generator=generator))
        width = int(torch.randint(1, remaining + 1, (1,), generator=generator))
        if trial % 2:  # few distinct values: many ties, at the threshold too
            scores = torch.randint(0, 4, (rows, remaining), generator=generator).double()
        else:
            scores = torch.rand(rows, remaining, generator=generator)
        budget = torch.randint(0, remaining + 1, (rows, 1), generator=generator)
        expected = torch.ones(rows, width, dtype=torch.bool)
        for r in range(rows):
            ranked = sorted(range(remaining), key=lambda j: (float(scores[r, j]), j))
            for j in ranked[:int(budget[r])]:
                if j < width:
                    expected[r, j] = False
        assert torch.equal(sparsegpt._keep_in_block(scores, budget, width), expected), trial
