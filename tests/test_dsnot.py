"""DSnoT refinement: exact sparsity and N:M kept, error reduced, equal to a slow float64 reference."""
from __future__ import annotations

import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.patterns import NM, Unstructured
from llmprune.pruners import make_pruner
from llmprune.pruners.dsnot import DSnoT, should_refine
from llmprune.stats import HESSIAN, MOMENTS, SQ_NORM, InputStats

PATTERNS = [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8)]
ALL_STATS = frozenset({SQ_NORM, MOMENTS, HESSIAN})


def shifted_inputs(tokens: int, features: int, seed: int, shift: float = 1.0, noise: float = 1.0) -> torch.Tensor:
    """Inputs ``[tokens, features]`` with clearly non-zero, channel-dependent means and variances."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(features, generator=gen) * shift
    spreads = torch.rand(features, generator=gen) * noise + 0.05
    return means + spreads * torch.randn(tokens, features, generator=gen)


def stats_of(inputs: torch.Tensor, needs=ALL_STATS, hessian_dtype=torch.float32) -> InputStats:
    stats = InputStats(inputs.shape[-1], needs, hessian_dtype=hessian_dtype)
    for batch in inputs.split(64):
        stats.update(batch)
    return stats


def expected_error(dense: torch.Tensor, sparse: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """e_i = Σ_j (W_ij − Ŵ_ij)·E[x_j] per row, in float64."""
    return (dense.double() - sparse.double()) @ stats.mean.double()


def zeros_per_group(weight: torch.Tensor, group: int) -> torch.Tensor:
    return (weight == 0).reshape(weight.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_refine_keeps_exact_sparsity_and_pattern(method: str, pattern) -> None:
    torch.manual_seed(0)
    dense = torch.randn(24, 64)
    inputs = shifted_inputs(512, 64, seed=1)
    stats = stats_of(inputs)
    base = make_pruner(method).prune(dense.clone(), stats, pattern).weight
    result = DSnoT(cycles=30, threshold=0.0).refine(dense, base, stats, pattern)
    refined = result.weight
    assert refined.dtype == base.dtype and refined.shape == base.shape
    assert result.info["dsnot_swaps_mean"] > 0  # it did something
    assert not torch.equal(refined, base)
    assert pattern.violations(refined) == 0
    group = pattern.m if isinstance(pattern, NM) else 64
    assert torch.equal(zeros_per_group(refined, group), zeros_per_group(base, group))
    assert not torch.signbit(refined[refined == 0]).any()  # +0.0 only
    grown = (refined != 0) & (base == 0)
    dropped = (refined == 0) & (base != 0)
    assert torch.equal(grown.sum(-1), dropped.sum(-1))  # one grown per one pruned, per row
    # a regrown weight has its ORIGINAL value; every other non-zero is the base pruner's value, or (SparseGPT,
    # a weight DSnoT pruned and regrew) the original one
    assert torch.equal(refined[grown], dense[grown])
    other = (refined != 0) & ~grown
    assert ((refined[other] == base[other]) | (refined[other] == dense[other])).all()
    assert result.info["dsnot_err_after"] < result.info["dsnot_err_before"]


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)], ids=str)
@pytest.mark.parametrize("method,e_factor,out_factor", [("magnitude", 0.05, 0.2), ("wanda", 0.05, 0.5),
                                                       ("sparsegpt", 0.5, 1.0)])
def test_refine_reduces_expected_and_actual_output_error(method: str, e_factor: float, out_factor: float,
                                                         pattern) -> None:
    """Inputs with strong means (small noise): magnitude and Wanda masks leave a large |e|, DSnoT shrinks
    it and with it the real output error ‖WX − ŴX‖ on the calibration inputs (here 3-10×). SparseGPT's
    update already compensates most of the mean (E[xxᵀ] holds it), so DSnoT only has to do better."""
    torch.manual_seed(2)
    dense = torch.randn(32, 128)
    inputs = shifted_inputs(1024, 128, seed=3, shift=2.0, noise=0.2)
    stats = stats_of(inputs)
    base = make_pruner(method).prune(dense.clone(), stats, pattern).weight
    refined = DSnoT(cycles=50, threshold=0.0).refine(dense, base, stats, pattern).weight
    before = expected_error(dense, base, stats).abs()
    after = expected_error(dense, refined, stats).abs()
    assert (after <= before + 1e-9).all()  # never worse in any row
    assert after.mean() < e_factor * before.mean()
    reference = inputs.double() @ dense.double().T
    base_out = (reference - inputs.double() @ base.double().T).norm()
    refined_out = (reference - inputs.double() @ refined.double().T).norm()
    assert refined_out < out_factor * base_out


def reference_refine(dense, pruned, stats, pattern, cycles: int, threshold: float, gamma: float):
    """DSnoT one row, one cycle, one candidate at a time, in float64 Python floats.

    Returns the refined weight, the swaps per row and the number of blocked grow attempts."""
    dense, out = dense.double(), pruned.double().clone()
    mean = [float(v) for v in stats.mean.double()]
    var = [float(v) for v in stats.variance.double()]
    norm = [float(v) for v in stats.channel_norm.double()]
    columns = dense.shape[1]
    swaps, blocks = [], 0
    for i in range(dense.shape[0]):
        w = [float(v) for v in dense[i]]
        cur = [float(v) for v in out[i]]
        blocked: set[int] = set()
        done = 0
        for _ in range(cycles):
            e = sum((w[j] - cur[j]) * mean[j] for j in range(columns))  # recomputed from scratch
            if abs(e) < threshold:
                break
            grow, best = None, None
            for j in range(columns):
                gain = w[j] * mean[j]
                if cur[j] == 0 and j not in blocked and abs(e - gain) < abs(e):
                    score = (1 if e > 0 else -1) * gain / var[j] ** gamma
                    if best is None or score > best:
                        grow, best = j, score
            if grow is None:
                break
            e_grown = e - w[grow] * mean[grow]
            if isinstance(pattern, NM):
                start = grow // pattern.m * pattern.m
                allowed = range(start, start + pattern.m)
            else:
                allowed = range(columns)
            prune, best = None, None
            for k in allowed:
                if cur[k] != 0 and abs(e_grown + cur[k] * mean[k]) < abs(e_grown):
                    score = abs(cur[k]) * norm[k]
                    if best is None or score < best:
                        prune, best = k, score
            if prune is None:
                blocked.add(grow)
                blocks += 1
                continue
            cur[grow], cur[prune] = w[grow], 0.0
            blocked.clear()
            done += 1
        out[i] = torch.tensor(cur, dtype=torch.float64)
        swaps.append(done)
    return out, swaps, blocks


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4), NM(4, 8)], ids=str)
@pytest.mark.parametrize("gamma,share", [(1.0, 0.0), (0.5, 0.5), (2.0, 0.2)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_vectorised_equals_slow_reference(method: str, pattern, gamma: float, share: float) -> None:
    """Same masks and values as the Python loop; thresholds at a share of the median initial |e|."""
    torch.manual_seed(4)
    dense = torch.randn(8, 32, dtype=torch.float64)
    inputs = shifted_inputs(256, 32, seed=5, shift=1.0, noise=0.5).double()
    stats = stats_of(inputs, hessian_dtype=torch.float64)
    # SparseGPT with its usual damping already cancels most of the mean error here; a heavily damped one leaves some
    base = make_pruner(method, **({"hessian_dtype": "float64", "percdamp": 1.0} if method == "sparsegpt" else {}))
    pruned = base.prune(dense.clone(), stats, pattern).weight
    threshold = share * float(expected_error(dense, pruned, stats).abs().median())
    result = DSnoT(cycles=25, threshold=threshold, gamma=gamma, dtype="float64").refine(dense, pruned, stats, pattern)
    expected, swaps, blocks = reference_refine(dense, pruned, stats, pattern, 25, threshold, gamma)
    assert sum(swaps) > 0
    if isinstance(pattern, NM):
        assert blocks > 0  # the path where a grown position's group has no prune partner is exercised
    assert torch.equal(result.weight != 0, expected != 0)  # exactly the same masks
    assert torch.equal(result.weight, expected)
    assert result.info["dsnot_swaps_max"] == max(swaps)
    assert result.info["dsnot_swaps_mean"] == pytest.approx(sum(swaps) / len(swaps), rel=1e-3)


def test_float32_default_matches_float64_on_clear_case() -> None:
    torch.manual_seed(6)
    dense = torch.randn(16, 64)
    stats = stats_of(shifted_inputs(256, 64, seed=7))
    pruned = make_pruner("wanda").prune(dense.clone(), stats, Unstructured(0.5)).weight
    single = DSnoT(cycles=10).refine(dense, pruned, stats, Unstructured(0.5)).weight
    double = DSnoT(cycles=10, dtype=torch.float64).refine(dense, pruned, stats, Unstructured(0.5)).weight
    assert single.dtype == torch.float32
    assert torch.equal(single != 0, double != 0)


def wanda_case(seed: int, rows: int, tokens: int, shift: float):
    """(dense ``[rows, 64]``, input stats with a mean shift, Unstructured(0.5), Wanda's pruned weight)."""
    torch.manual_seed(seed)
    dense = torch.randn(rows, 64)
    stats = stats_of(shifted_inputs(tokens, 64, seed=seed + 1, shift=shift))
    pattern = Unstructured(0.5)
    return dense, stats, pattern, make_pruner("wanda").prune(dense.clone(), stats, pattern).weight


def test_threshold_stops_early() -> None:
    """|e| only falls, so a row either stops once below the threshold or runs exactly as without one."""
    dense, stats, pattern, pruned = wanda_case(seed=8, rows=32, tokens=512, shift=1.5)
    full = DSnoT(cycles=50, threshold=0.0).refine(dense, pruned, stats, pattern)
    before = expected_error(dense, pruned, stats).abs().sort().values
    final = expected_error(dense, full.weight, stats).abs().sort().values
    # thresholds between two rows' errors, never on one: the median before, and below the 4 worst final rows
    seen = {"untouched": 0, "above": 0, "stopped": 0}
    for threshold in (float(before[15] + before[16]) / 2, float(final[27] + final[28]) / 2):
        early = DSnoT(cycles=50, threshold=threshold).refine(dense, pruned, stats, pattern)
        assert early.info["dsnot_swaps_mean"] < full.info["dsnot_swaps_mean"]
        start = expected_error(dense, pruned, stats).abs()
        after = expected_error(dense, early.weight, stats).abs()
        untouched = start < threshold
        assert torch.equal(early.weight[untouched], pruned[untouched])
        above = after >= threshold
        assert torch.equal(early.weight[above], full.weight[above])
        stopped = ~untouched & ~above  # changed, and ended below the threshold
        for key, rows in (("untouched", untouched), ("above", above), ("stopped", stopped)):
            seen[key] += int(rows.sum())
    assert min(seen.values()) > 0, seen
    huge = DSnoT(cycles=50, threshold=float(before[-1]) * 2).refine(dense, pruned, stats, pattern)
    assert torch.equal(huge.weight, pruned) and huge.info["dsnot_cycles"] == 0


def test_cycles_bound_the_swaps() -> None:
    dense, stats, pattern, pruned = wanda_case(seed=10, rows=16, tokens=256, shift=2.0)
    zero = DSnoT(cycles=0).refine(dense, pruned, stats, pattern)
    assert torch.equal(zero.weight, pruned)
    assert zero.info["dsnot_cycles"] == 0 and zero.info["dsnot_err_after"] == zero.info["dsnot_err_before"]
    one = DSnoT(cycles=1, threshold=0.0).refine(dense, pruned, stats, pattern)
    assert ((one.weight != pruned).sum(-1) <= 2).all()
    assert one.info["dsnot_swaps_max"] == 1 and one.info["dsnot_cycles"] == 1
    three = DSnoT(cycles=3, threshold=0.0).refine(dense, pruned, stats, pattern)
    assert three.info["dsnot_swaps_max"] <= 3 and ((three.weight != pruned).sum(-1) <= 6).all()


def test_zero_mean_inputs_leave_the_mask_alone() -> None:
    """With E[x] = 0 every expected contribution is 0: no candidate, nothing changes."""
    dense = torch.randn(8, 16)
    stats = InputStats(16, ALL_STATS)
    x = torch.randn(64, 16)
    stats.update(torch.cat([x, -x]))
    pruned = make_pruner("wanda").prune(dense.clone(), stats, NM(2, 4)).weight
    result = DSnoT(threshold=0.0).refine(dense, pruned, stats, NM(2, 4))
    assert torch.equal(result.weight, pruned) and result.info["dsnot_swaps_max"] == 0


def test_should_refine_and_skip_option() -> None:
    assert should_refine("model.layers.0.mlp.down_proj", frozenset())
    assert not should_refine("model.layers.0.mlp.down_proj", frozenset({"mlp"}))
    assert should_refine("model.layers.0.self_attn.q_proj", frozenset({"mlp"}))
    refiner = DSnoT(skip=("self_attn", "o_proj"))
    assert not refiner.applies_to("model.layers.3.self_attn.k_proj")
    assert refiner.applies_to("model.layers.3.mlp.up_proj")
    assert DSnoT(skip="mlp").skip == frozenset({"mlp"})


def test_errors_name_the_problem() -> None:
    dense = torch.randn(4, 8)
    with pytest.raises(LLMPruneError, match="MOMENTS"):
        DSnoT().refine(dense, dense, InputStats(8, frozenset({SQ_NORM})), Unstructured(0.5))
    stats = stats_of(torch.randn(16, 8), needs=frozenset({SQ_NORM, MOMENTS}))
    with pytest.raises(LLMPruneError, match="same shape"):
        DSnoT().refine(dense, dense[:2], stats, Unstructured(0.5))
    with pytest.raises(LLMPruneError, match="divisible"):
        DSnoT().refine(torch.randn(4, 6), torch.randn(4, 6), stats_of(torch.randn(8, 6)), NM(2, 4))
    for bad in (dict(cycles=-1), dict(cycles=2.5), dict(threshold=-0.1), dict(gamma=float("nan")), dict(dtype="int8")):
        with pytest.raises(LLMPruneError):
            DSnoT(**bad)
    assert DSnoT.needs == frozenset({SQ_NORM, MOMENTS})
