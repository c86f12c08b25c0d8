"""Quantization: the min-max grid, and the GPTQ / joint SparseGPT+quantization sweep against a direct
float64 OBS reference."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import PERCDAMP, correlated_inputs, random_weight, stats_for
from safetensors.torch import load_file, save_file

from llmprune.errors import LLMPruneError
from llmprune.patterns import NM, Unstructured
from llmprune.pruners.quantizer import CLIP_SHRINKS, Quantized, Quantizer
from llmprune.pruners.sparsegpt import GPTQ, SparseGPT

ROWS, COLUMNS, BLOCKSIZE = 16, 64, 16
HYBRID = NM(2, 4, ((12, 28),))  # splits the groups of 8 columns 8-15 and 24-31 between the regions


@pytest.fixture(autouse=True)
def one_thread():
    """Every op here is tiny: OpenMP only adds barriers, which thrash on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- the grid

def test_asymmetric_grid_by_hand() -> None:
    quantizer = Quantizer(bits=4, group_size=-1, symmetric=False)
    weights = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    scale, zero = quantizer.params(weights)
    assert scale.dtype == zero.dtype == torch.float16
    assert scale.item() == 0.2000732421875 and zero.item() == 5  # 0.2 rounded up to float16; round(1 / s)
    codes = quantizer.quantize(weights, scale[:, None], zero[:, None])
    assert codes.dtype == torch.uint8 and codes.tolist() == [[0, 7, 15, 5]]
    expected = (torch.tensor([[-5.0, 2.0, 10.0, 0.0]]) * scale.float()).tolist()
    assert Quantizer.dequantize(codes, scale[:, None], zero[:, None]).tolist() == expected


def test_symmetric_grid_by_hand() -> None:
    quantizer = Quantizer(bits=4, group_size=-1, symmetric=True)
    weights = torch.tensor([[-0.45, 0.25, 1.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
    scale, zero = quantizer.params(weights)
    assert scale.tolist() == [0.2000732421875, 0.05334472656250]  # 3/15 and 0.8/15, rounded up to float16
    assert zero.tolist() == [8, 8]
    codes = quantizer.quantize(weights, scale[:, None], zero[:, None])
    assert codes[0].tolist() == [6, 9, 15, 8]  # +amax is 7.5 steps up: the last code, half a step off
    assert codes[1].tolist() == [10, 12, 14, 15]  # all positive: the grid still spans ±amax


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_in_range_and_error_within_half_a_step(bits, symmetric) -> None:
    quantizer = Quantizer(bits, 8, symmetric)
    weights = torch.randn(32, 8, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-3, 1, 32)[:, None]
    scale, zero = quantizer.params(weights)
    codes = quantizer.quantize(weights, scale[:, None], zero[:, None])
    assert int(codes.max()) <= 2**bits - 1
    error = (Quantizer.dequantize(codes, scale[:, None], zero[:, None]) - weights).abs()
    assert (error <= scale.float()[:, None] / 2).all()  # the float16 scale was rounded up: no end is clamped


def test_degenerate_groups_get_a_nonzero_scale() -> None:
    for symmetric in (True, False):
        quantizer = Quantizer(4, -1, symmetric)
        weights = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e-12, -1e-12, 0.0, 0.0], [1.0, -2.0, 3.0, 4.0]])
        kept = torch.tensor([[True] * 4, [True] * 4, [False] * 4])  # row 3: everything pruned
        scale, zero = quantizer.params(weights, kept)
        assert (scale > 0).all() and torch.isfinite(scale).all()
        assert scale[0] == 1 and scale[2] == 1
        codes = quantizer.quantize(weights * kept, scale[:, None], zero[:, None])
        values = Quantizer.dequantize(codes, scale[:, None], zero[:, None])
        assert (codes == zero[:, None].to(torch.uint8))[[0, 2]].all()
        assert values[[0, 2]].eq(0).all() and not values.signbit()[[0, 2]].any()
        assert (values[1].abs() <= 2.0**-24).all()


def clip_reference(quantizer: Quantizer, weights: torch.Tensor, kept: torch.Tensor) -> list[tuple[float, float]]:
    """The searched grid row by row, from the formulas: every shrink's float16 grid and its Σ|ŵ − w|^2.4."""
    result = []
    for row, keep in zip(weights.double().tolist(), kept.tolist()):
        fitted = [w for w, k in zip(row, keep) if k]
        best = None
        for shrink in (1.0, *CLIP_SHRINKS):
            low, high = min(min(fitted), 0.0) * shrink, max(max(fitted), 0.0) * shrink
            if quantizer.symmetric:
                low, high = -max(-low, high), max(-low, high)
            scale = (high - low) / quantizer.max_code or 1.0
            stored = float(torch.tensor(scale).to(torch.float16))
            if stored < scale:  # rounded up to the next float16
                stored = float(torch.nextafter(torch.tensor(stored, dtype=torch.float16), torch.tensor(65504.0,
                                                                                                   dtype=torch.float16)))
            zero = 2 ** (quantizer.bits - 1) if quantizer.symmetric else min(max(round(-low / stored), 0), 15)
            error = sum(abs((min(max(round(w / stored) + zero, 0), quantizer.max_code) - zero) * stored - w) ** 2.4
                        for w in fitted)
            if best is None or error < best[0]:
                best = (error, stored, float(zero))
        result.append(best[1:])
    return result


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_matches_a_direct_search(symmetric) -> None:
    generator = torch.Generator().manual_seed(3)
    weights = torch.randn(12, 32, generator=generator)
    weights[0, 5] = 4.0  # an outlier: clipping it buys a finer grid for the other weights
    weights[1] = 0.25  # nothing to clip
    kept = torch.rand(12, 32, generator=generator) > 0.3
    kept[0, 5] = True
    quantizer = Quantizer(4, -1, symmetric, clip=True)
    scale, zero = quantizer.params(weights, kept)
    assert list(zip(scale.float().tolist(), zero.float().tolist())) == clip_reference(quantizer, weights, kept)
    plain = Quantizer(4, -1, symmetric).params(weights, kept)
    assert (scale < plain[0]).any() and (scale <= plain[0]).all()  # ranges only shrink
    for s, z, reference in ((scale, zero, True), (*plain, False)):
        codes = quantizer.quantize(weights * kept, s[:, None], z[:, None])
        values = Quantizer.dequantize(codes, s[:, None], z[:, None])
        assert values[~kept].eq(0).all()  # pruned weights still read back as exactly 0
        error = ((values - weights).abs().pow(2.4) * kept).sum(-1)
        if reference:
            searched = error
    assert (searched <= error).all() and (searched < error).any()


def test_options_are_validated_with_the_fix() -> None:
    assert Quantizer() == Quantizer(4, 128, True)
    assert Quantizer(group_size=-1).groups(100) == 1 and Quantizer(group_size=8).groups(100) == 13
    for bad, match in [({"group_size": 6}, "--group-size must be a positive multiple of 4 or -1.*got 6"),
                       ({"group_size": 0}, "--group-size"), ({"group_size": -2}, "--group-size"),
                       ({"bits": 1}, "--quantize takes 2 to 8 bits"), ({"bits": 9}, "--quantize"),
                       ({"bits": 4.0}, "--quantize"), ({"symmetric": 1}, "--sym or --asym"),
                       ({"clip": 1}, "clip")]:
        with pytest.raises(LLMPruneError, match=match):
            Quantizer(**bad)
    with pytest.raises(AttributeError):
        Quantizer().bits = 3  # frozen


# ------------------------------------------------------------------------------------ the float64 reference

@dataclass
class Reference:
    weight: torch.Tensor  # float64 [out, in]
    keep: torch.Tensor  # the mask
    codes: torch.Tensor | None
    scales: torch.Tensor
    zeros: torch.Tensor
    loss: float
    quant_loss: float


def reference_sweep(weight: torch.Tensor, hessian: torch.Tensor, quantizer: Quantizer | None,
                    pattern=None, keep: torch.Tensor | None = None, reselect_every: int = BLOCKSIZE,
                    act_order: bool = False) -> Reference:
    """Column-by-column OBS in float64 with explicit inverses: no blocks, no lazy updates, no Cholesky.

    Columns go in processing order (the dense ranges of a hybrid ``pattern`` last; with ``act_order``
    the runs of m columns of an N:M pattern, or single columns, by decreasing sum of diag H). With F the columns
    not yet fixed and H_F⁻¹ = inv(H[F, F]), column j is set to q_j (0 if pruned, else its value on the
    grid of its group, or as it is without a quantizer) and the free columns move by
    −(w_j − q_j)/H_F⁻¹[0,0] · H_F⁻¹[0, :]. Masks: N:M at the first column of each group of m (scores
    w²/H_F⁻¹[0,0]), unstructured every ``reselect_every`` columns (each row prunes the columns before the
    next pick among its remaining-budget lowest scores), or the fixed ``keep``. A quantization group's grid
    is fitted when its first column comes, to its current weights not pruned so far.
    Everything comes back in dense column order.
    """
    rows, columns = weight.shape
    order = torch.arange(columns)
    if isinstance(pattern, NM) and pattern.dense:
        dense = pattern.dense_columns(columns)
        order = torch.cat([(~dense).nonzero().flatten(), dense.nonzero().flatten()])
    if act_order:
        width = pattern.m if isinstance(pattern, NM) else 1
        energy = [float(hessian.diagonal()[g * width:(g + 1) * width].sum()) for g in range(columns // width)]
        ranked = sorted(range(len(energy)), key=lambda g: (-energy[g], g))
        order = torch.tensor([g * width + c for g in ranked for c in range(width)])
    sparse_width = columns - (int(pattern.dense_columns(columns).sum()) if isinstance(pattern, NM) else 0)
    h = hessian.double().clone()
    h.diagonal().add_(PERCDAMP * h.diagonal().mean())
    w, h = weight.double()[:, order], h[order][:, order]
    known = torch.ones(rows, columns, dtype=torch.bool) if keep is None else keep[:, order].clone()
    budget = [pattern.pruned_per_row(columns)] * rows if isinstance(pattern, Unstructured) else []
    group = quantizer.group_of(order, columns) if quantizer else None
    codes = torch.zeros(rows, columns, dtype=torch.uint8)
    scales = torch.ones(rows, quantizer.groups(columns) if quantizer else 0, dtype=torch.float16)
    zeros = torch.zeros_like(scales)
    tails = [torch.linalg.inv(h[j:, j:]) for j in range(columns)]  # H_F⁻¹ for F = j..in−1
    d2 = torch.stack([t[0, 0] for t in tails])
    loss = quant_loss = 0.0

    def prune_lowest(row: int, first: int, scores: list[float], count: int, before: int) -> None:
        for c in sorted(range(len(scores)), key=lambda c: (scores[c], c))[:count]:  # ties → lower index
            if c < before:
                known[row, first + c] = False
                if budget:
                    budget[row] -= 1

    for j in range(columns):
        tail, scores = tails[j], w[:, j:].square() / d2[j:]
        if isinstance(pattern, NM) and j % pattern.m == 0 and j < sparse_width:
            for r in range(rows):
                prune_lowest(r, j, scores[r, :pattern.m].tolist(), pattern.m - pattern.n, pattern.m)
        if isinstance(pattern, Unstructured) and j % reselect_every == 0:
            for r in range(rows):
                prune_lowest(r, j, scores[r].tolist(), budget[r], reselect_every)
        if quantizer is None:
            q = torch.where(known[:, j], w[:, j], 0.0)
        else:
            g = int(group[j])
            if not (group[:j] == g).any():  # the group's first column: fit its grid now
                members = (group == g).nonzero().flatten()
                scales[:, g], zeros[:, g] = quantizer.params(w[:, members], known[:, members])
            codes[:, j] = quantizer.quantize(w[:, j], scales[:, g], zeros[:, g])
            codes[~known[:, j], j] = zeros[~known[:, j], g].to(torch.uint8)
            q = Quantizer.dequantize(codes[:, j], scales[:, g], zeros[:, g]).double()
            quant_loss += float((known[:, j] * (w[:, j] - q)).square().sum() / tail[0, 0] / 2)
        loss += float((w[:, j] - q).square().sum() / tail[0, 0] / 2)
        w[:, j:] -= ((w[:, j] - q) / tail[0, 0])[:, None] * tail[0][None, :]
        w[:, j] = q
    back = torch.argsort(order)
    return Reference(w[:, back], known[:, back], codes[:, back] if quantizer else None, scales, zeros, loss, quant_loss)


def problem(seed: int = 0):
    inputs = correlated_inputs(COLUMNS, tokens=256, seed=seed)
    return inputs, random_weight(ROWS, COLUMNS, seed=seed + 1).double(), stats_for(inputs, torch.float64)


def assert_matches_reference(result, expected: Reference) -> None:
    """Same codes on the same grids, so the same weight bit for bit. The mask is checked through them: a
    weight pruned on one side and rounded on the other would send a different error to every later column."""
    assert torch.equal(result.quantized.codes, expected.codes)
    assert torch.equal(result.quantized.scales, expected.scales)
    assert torch.equal(result.quantized.zeros, expected.zeros)
    assert torch.equal(result.weight, expected.weight)
    assert torch.equal(result.weight.float(), result.quantized.dequantize())
    assert not result.weight[~expected.keep].any()
    assert result.info["obs_loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert result.info["quant_loss"] == pytest.approx(expected.quant_loss, rel=1e-5)


QUANTIZERS = [Quantizer(4, 8, True), Quantizer(4, 8, False), Quantizer(3, -1, True), Quantizer(4, -1, False),
              Quantizer(4, 8, False, clip=True)]


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=str)
@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4), HYBRID], ids=str)
def test_joint_sweep_matches_float64_reference(pattern, quantizer) -> None:
    _, weight, stats = problem()
    hessian = stats.hessian.clone()
    result = SparseGPT(blocksize=BLOCKSIZE, hessian_dtype=torch.float64).prune(weight, stats, pattern, quantizer)
    expected = reference_sweep(weight, hessian, quantizer, pattern)
    assert torch.equal(stats.hessian, hessian)
    assert_matches_reference(result, expected)
    assert pattern.violations(result.weight) == 0
    alone = reference_sweep(weight, hessian, None, pattern).keep  # the mask pruning alone would pick ...
    assert not torch.equal(alone, expected.keep)  # ... is not the joint one: the rounding errors move the scores


@pytest.mark.parametrize("quantizer", [None, Quantizer(4, 8, False), Quantizer(4, 8, False, clip=True)], ids=str)
@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4), Unstructured(0.0)], ids=str)
def test_act_order_sweep_matches_float64_reference(pattern, quantizer) -> None:
    if quantizer is None and pattern == Unstructured(0.0):
        pytest.skip("nothing to prune or round: every order gives the weight back")
    _, weight, stats = problem(seed=4)
    hessian = stats.hessian.clone()
    sweep = SparseGPT(blocksize=BLOCKSIZE, hessian_dtype=torch.float64, act_order=True)
    result = sweep.prune(weight, stats, pattern, quantizer)
    expected = reference_sweep(weight, hessian, quantizer, pattern, act_order=True)
    if quantizer is None:
        assert torch.equal(result.weight != 0, expected.keep)
        torch.testing.assert_close(result.weight, expected.weight, rtol=1e-9, atol=1e-12)
        assert result.info["obs_loss"] == pytest.approx(expected.loss, rel=1e-5)
    else:
        assert_matches_reference(result, expected)
    assert pattern.violations(result.weight) == 0
    left_to_right = reference_sweep(weight, hessian, quantizer, pattern)
    assert not torch.equal(expected.weight, left_to_right.weight)  # the order changes the result
    with pytest.raises(LLMPruneError, match="act-order and the hybrid split"):
        sweep.prune(weight, stats, HYBRID, quantizer)


def wanda_like_mask(weight: torch.Tensor, inputs: torch.Tensor, pattern) -> torch.Tensor:
    return pattern.keep_mask(weight.abs() * inputs.square().mean(0).sqrt())


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=str)
@pytest.mark.parametrize("mask", ["dense", "2:4", "unstructured:0.6"])
def test_fixed_mask_gptq_matches_float64_reference(mask, quantizer) -> None:
    inputs, weight, stats = problem(seed=3)
    pattern = NM(2, 4) if mask == "2:4" else Unstructured(0.6)
    keep = None if mask == "dense" else wanda_like_mask(weight, inputs, pattern)
    result = GPTQ(blocksize=BLOCKSIZE, hessian_dtype="float64").quantize(weight, stats, quantizer, keep)
    assert_matches_reference(result, reference_sweep(weight, stats.hessian, quantizer, keep=keep))
    if keep is not None:  # the mask never changes: pruned weights hold the zero point, only kept ones are non-zero
        group = quantizer.group_of(torch.arange(COLUMNS), COLUMNS)
        zero_point = result.quantized.zeros[:, group].to(torch.uint8)
        assert torch.equal(result.quantized.codes[~keep], zero_point[~keep])
        assert not (result.weight != 0)[~keep].any() and not result.weight.signbit()[~keep].any()


def test_pruning_alone_matches_the_reference_too() -> None:
    """Without a quantizer the same reference pins pruning alone: the three uses share one sweep."""
    _, weight, stats = problem()
    result = SparseGPT(blocksize=BLOCKSIZE, hessian_dtype=torch.float64).prune(weight, stats, HYBRID)
    expected = reference_sweep(weight, stats.hessian, None, HYBRID)
    assert result.quantized is None and "quant_loss" not in result.info
    assert torch.equal(result.weight != 0, expected.keep)
    assert torch.allclose(result.weight, expected.weight, atol=1e-9, rtol=0)
    assert result.info["obs_loss"] == pytest.approx(expected.loss, rel=1e-6)


# ------------------------------------------------------------------------------------ what it is for

def reconstruction_error(weight: torch.Tensor, changed: torch.Tensor, inputs: torch.Tensor) -> float:
    """‖X (W − Ŵ)ᵀ‖, the output error on the calibration inputs."""
    return float(torch.linalg.norm(inputs.float() @ (weight - changed.float()).T))


def round_to_nearest(weight: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """Each group's grid fitted to its non-zero weights, every weight rounded; zeros stay +0.0."""
    columns = weight.shape[1]
    width = quantizer.width(columns)
    out = torch.empty_like(weight)
    for start in range(0, columns, width):
        group = weight[:, start:start + width]
        scale, zero = quantizer.params(group, group != 0)
        codes = quantizer.quantize(group, scale[:, None], zero[:, None])
        out[:, start:start + width] = Quantizer.dequantize(codes, scale[:, None], zero[:, None]) * (group != 0)
    return out


@pytest.mark.parametrize("quantizer", [Quantizer(4, 32, True), Quantizer(3, -1, False)], ids=str)
def test_gptq_beats_round_to_nearest(quantizer) -> None:
    inputs, weight = correlated_inputs(decay=0.01), random_weight()
    stats = stats_for(inputs)
    gptq = GPTQ(blocksize=32).quantize(weight, stats, quantizer)
    assert gptq.weight.dtype == torch.float32
    assert reconstruction_error(weight, gptq.weight, inputs) < 0.7 * reconstruction_error(
        weight, round_to_nearest(weight, quantizer), inputs)


@pytest.mark.parametrize("pattern,factor", [(Unstructured(0.5), 0.8), (NM(2, 4), 0.96)], ids=str)
def test_joint_beats_pruning_then_rounding(pattern, factor) -> None:
    """2:4's own error dwarfs the rounding error here, so the gain in the total is smaller."""
    inputs, weight = correlated_inputs(decay=0.01), random_weight()
    stats, quantizer = stats_for(inputs), Quantizer(3, 32, True)
    sparsegpt = SparseGPT(blocksize=32)
    joint = sparsegpt.prune(weight, stats, pattern, quantizer)
    then_rounded = round_to_nearest(sparsegpt.prune(weight, stats, pattern).weight, quantizer)
    assert pattern.violations(joint.weight) == 0
    error = reconstruction_error(weight, joint.weight, inputs)
    assert error < factor * reconstruction_error(weight, then_rounded, inputs)
    # the loss splits into pruning and rounding, and the total is the damped reconstruction error
    damped = stats.hessian.double()
    damped.diagonal().add_(PERCDAMP * damped.diagonal().mean())
    delta = weight.double() - joint.weight.double()
    assert joint.info["obs_loss"] == pytest.approx(float((delta @ damped * delta).sum() / 2), rel=1e-3)
    assert 0 < joint.info["quant_loss"] < joint.info["obs_loss"]


def test_checkpoint_round_trip_is_exact(tmp_path) -> None:
    """What a reader computes from the float16 scales and zero points is bit for bit the returned weight."""
    inputs, weight = correlated_inputs(), random_weight()
    inputs[:, 5] = 0.0  # a dead input: its weights are dropped, and must read back as +0.0
    result = SparseGPT(blocksize=32).prune(-weight.abs(), stats_for(inputs), NM(2, 4, ((32, 64),)),
                                           Quantizer(4, 16, False))
    quantized = result.quantized
    assert isinstance(quantized, Quantized) and quantized.codes.dtype == torch.uint8
    assert quantized.scales.shape == quantized.zeros.shape == (64, 8) and quantized.scales.dtype == torch.float16
    tensors = {"codes": quantized.codes, "scales": quantized.scales, "zeros": quantized.zeros}
    save_file(tensors, tmp_path / "q.safetensors")
    stored = load_file(tmp_path / "q.safetensors")
    group = torch.arange(COLUMNS * 2) // 16
    read = (stored["codes"].float() - stored["zeros"].float()[:, group]) * stored["scales"].float()[:, group]
    assert torch.equal(read.view(torch.int32), result.weight.view(torch.int32))  # −0.0 ≠ +0.0 here
    assert (result.weight[:, 5] == 0).all() and result.info["dead_inputs"] == 1
    assert not result.weight[result.weight == 0].signbit().any()  # all weights were negative: every 0 is +0.0
    assert NM(2, 4, ((32, 64),)).violations(result.weight) == 0


def test_factor_is_shared_with_and_without_quantization() -> None:
    inputs, weight = correlated_inputs(), random_weight()
    stats, sparsegpt = stats_for(inputs), SparseGPT(blocksize=32)
    reused = [sparsegpt.prune(weight, stats, NM(2, 4)).info["factor_reused"],
              sparsegpt.prune(weight, stats, NM(2, 4), Quantizer()).info["factor_reused"],
              sparsegpt.quantize(weight, stats, Quantizer()).info["factor_reused"]]
    assert reused == [False, True, True]


def test_bad_arguments() -> None:
    stats = stats_for(correlated_inputs())
    with pytest.raises(LLMPruneError, match="GPTQ needs a bool keep-mask"):
        GPTQ().quantize(random_weight(), stats, Quantizer(), keep=torch.ones(ROWS, COLUMNS, dtype=torch.bool))
    with pytest.raises(LLMPruneError, match="GPTQ needs the Hessian"):
        GPTQ().quantize(random_weight(), None, Quantizer())
    with pytest.raises(LLMPruneError, match="GPTQ blocksize"):
        GPTQ(blocksize=0)
    with pytest.raises(LLMPruneError, match="act_order is True or False"):
        GPTQ(act_order="yes")


def test_recipe_routes_clip_and_act_order() -> None:
    from llmprune.recipe import Recipe

    joint = Recipe.build("sparsegpt", "2:4", quantize="w4", clip=True, act_order=True)
    assert joint.quantizer.clip and joint.pruner.act_order and joint.gptq is None
    assert joint.record(None, "cpu").quantize["clip"] is True
    then_gptq = Recipe.build("wanda", "2:4", quantize="w4", act_order=True)  # Wanda's mask, then an ordered GPTQ
    assert then_gptq.gptq.act_order and then_gptq.pruner_options == {"act_order": True}
    with pytest.raises(LLMPruneError, match="--clip .* needs --quantize"):
        Recipe.build("sparsegpt", "2:4", clip=True)
    with pytest.raises(LLMPruneError, match="--act-order .* needs --quantize"):
        Recipe.build("wanda", "2:4", act_order=True)
    assert Recipe.build("sparsegpt", "2:4", quantize="w4").pruner.act_order  # the default when quantizing
    assert Recipe.build("wanda", "2:4", quantize="w4").gptq.act_order
    assert not Recipe.build("sparsegpt", "2:4", quantize="w4", act_order=False).pruner.act_order
    assert not Recipe.build("sparsegpt", "2:4").pruner.act_order  # pruning alone keeps the paper's order
    with pytest.raises(LLMPruneError, match="--act-order and the hybrid split"):
        Recipe.build("sparsegpt", "hybrid:2:4", dense_fraction=0.25, act_order=True)
