"""Marigold's depth math (difflab.models.depth_align): normalisation, least-squares alignment, test-time
ensembling and metrics, checked against closed forms, numpy (np.quantile, np.polyfit) and invariances;
and the one-step timestep flaw of 'leading' spacing that Garcia et al. (2025) found in Marigold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.diffusion.discretization import make_plan, timestep_spacing
from difflab.diffusion.schedules import make_schedule
from difflab.errors import DifflabError
from difflab.models.depth_align import (
    abs_rel,
    align_members,
    align_scale_shift,
    delta1,
    denormalize_depth,
    ensemble_depth,
    ensemble_objective,
    normalize_depth,
    pair_order_accuracy,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def smooth_depth(seed: int, size: int = 16) -> torch.Tensor:
    """A smooth positive (size, size) float64 depth map: a bilinearly upsampled 4 x 4 random grid."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return 0.5 + fine[0, 0]


def batch(n: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 4 * torch.rand(n, 1, size, size, generator=g, dtype=torch.float64)  # (B, 1, H, W)


# --- normalisation, Eq. 3 ---


def test_normalize_then_denormalize_is_the_identity():
    depth = batch()
    mask = batch(seed=1) > 1.5
    for m in (None, mask):
        normalized, percentiles = normalize_depth(depth, m)
        torch.testing.assert_close(denormalize_depth(normalized, percentiles), depth, rtol=0, atol=1e-12)


def test_the_percentiles_land_on_minus_one_and_one():
    depth = batch(size=10)
    normalized, (d2, d98) = normalize_depth(depth)
    # torch.quantile and np.quantile both interpolate linearly, and an affine map commutes with that.
    ends = torch.quantile(normalized.reshape(3, -1), torch.tensor([0.02, 0.98], dtype=torch.float64), dim=1)
    torch.testing.assert_close(ends, torch.tensor([[-1.0] * 3, [1.0] * 3], dtype=torch.float64))
    expected = np.quantile(depth.reshape(3, -1).numpy(), [0.02, 0.98], axis=1)
    np.testing.assert_allclose(torch.stack([d2, d98]).numpy(), expected, rtol=1e-12)


def test_normalisation_is_invariant_to_a_positive_affine_map():
    depth = batch()
    a = torch.tensor([0.1, 3.0, 70.0], dtype=torch.float64)[:, None, None, None]
    b = torch.tensor([-5.0, 0.0, 2.0], dtype=torch.float64)[:, None, None, None]
    torch.testing.assert_close(normalize_depth(a * depth + b)[0], normalize_depth(depth)[0])


def test_a_mask_takes_the_percentiles_over_valid_pixels_only():
    depth, mask = batch(), batch(seed=1) > 2.0
    wild = torch.where(mask, depth, torch.tensor(1e6, dtype=torch.float64))  # invalid pixels do not count
    _, (d2, d98) = normalize_depth(wild, mask)
    for i in range(3):
        valid = depth[i][mask[i]].numpy()
        np.testing.assert_allclose([d2[i], d98[i]], np.quantile(valid, [0.02, 0.98]), rtol=1e-12)


def test_a_flat_image_maps_to_zero_and_back():
    depth = torch.full((2, 4, 4), 0.7, dtype=torch.float64)
    normalized, percentiles = normalize_depth(depth)
    assert torch.equal(normalized, torch.zeros_like(depth))
    torch.testing.assert_close(denormalize_depth(normalized, percentiles), depth)


# --- least-squares alignment, Sec. 4.1 ---


def test_align_recovers_a_known_scale_and_shift():
    target = batch()
    s = torch.tensor([2.0, 0.25, 7.0], dtype=torch.float64)
    t = torch.tensor([-1.0, 3.0, 0.5], dtype=torch.float64)
    pred = (target - t[:, None, None, None]) / s[:, None, None, None]
    aligned, scale, shift = align_scale_shift(pred, target)
    torch.testing.assert_close(scale, s)
    torch.testing.assert_close(shift, t)
    torch.testing.assert_close(aligned, target)


def test_align_matches_numpy_polyfit():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    target = 3 * pred + torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    _, scale, shift = align_scale_shift(pred, target)
    for i in range(4):
        slope, intercept = np.polyfit(pred[i].flatten().numpy(), target[i].flatten().numpy(), 1)
        assert scale[i].item() == pytest.approx(slope, rel=1e-10)
        assert shift[i].item() == pytest.approx(intercept, rel=1e-10)


def test_align_respects_the_mask():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64)
    target = 2 * pred + 0.3 * torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.4
    target = torch.where(mask, target, torch.nan)  # missing ground truth must not leak into the fit
    aligned, scale, shift = align_scale_shift(pred, target, mask)
    assert torch.isfinite(aligned).all()
    for i in range(2):
        slope, intercept = np.polyfit(pred[i][mask[i]].numpy(), target[i][mask[i]].numpy(), 1)
        assert (scale[i].item(), shift[i].item()) == pytest.approx((slope, intercept), rel=1e-10)


# --- test-time ensembling, Sec. 3.3 ---


def test_ensemble_of_identical_members_returns_the_member():
    d = smooth_depth(0)
    unit = (d - d.min()) / (d.max() - d.min())  # the merged map is put on [0, 1]
    for member in (d, unit):
        merged, uncertainty = ensemble_depth(member.expand(4, 16, 16), steps=20)
        torch.testing.assert_close(merged, (member - member.min()) / (member.max() - member.min()))
        assert torch.equal(uncertainty, torch.zeros_like(member))
    torch.testing.assert_close(ensemble_depth(unit.expand(3, 1, 16, 16), steps=20)[0], unit[None])


def test_ensemble_of_affine_copies_is_an_affine_map_of_the_depth():
    d = smooth_depth(1)
    a = torch.tensor([0.5, 2.0, 9.0, 1.0], dtype=torch.float64)
    b = torch.tensor([3.0, -1.0, 0.0, 40.0], dtype=torch.float64)
    members = a[:, None, None] * d + b[:, None, None]
    for merge in ("median", "mean"):
        merged, _ = ensemble_depth(members, merge=merge, steps=20)
        correlation = torch.corrcoef(torch.stack([merged.flatten(), d.flatten()]))[0, 1]
        assert correlation.item() == pytest.approx(1.0, abs=1e-4)
        torch.testing.assert_close(align_scale_shift(merged[None], d[None])[0][0], d)


def test_ensemble_of_one_is_a_passthrough():
    member = smooth_depth(2)[None] * 3  # (1, H, W), not on [0, 1]
    merged, uncertainty = ensemble_depth(member)
    assert torch.equal(merged, member[0])
    assert torch.equal(uncertainty, torch.zeros_like(member[0]))


def noisy_members(n: int = 5, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """n affinely distorted copies of one map, each with its own pixel noise (in units of the map)."""
    d = smooth_depth(3)
    g = torch.Generator().manual_seed(5)
    a = 0.5 + 2 * torch.rand(n, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    eps = noise * torch.randn(n, *d.shape, generator=g, dtype=torch.float64)
    return a[:, None, None] * (d + eps) + b[:, None, None], d


def test_the_optimiser_improves_on_the_min_max_start_without_collapsing():
    members, _ = noisy_members()
    flat = members.reshape(5, -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    start = ensemble_objective((flat - lo) / (hi - lo))
    scale, shift = align_members(members, steps=100)
    aligned = scale[:, None] * flat + shift[:, None]
    assert ensemble_objective(aligned) < 0.9 * start
    assert (scale > 0).all()
    merged = aligned.median(dim=0).values
    assert merged.max() - merged.min() > 0.5  # still a depth map, not the constant s_i -> 0


def test_the_paper_rms_form_prefers_collapse_and_the_squared_form_does_not():
    """Why ensemble_objective squares Eq. 4's RMS: scale the aligned members by k towards a constant. Both
    the RMS and R are linear in k, so for members disagreeing by more than lambda in RMS the RMS form falls
    all the way to k -> 0; the squared form (k^2 against k) has its minimum at a finite k."""
    members, _ = noisy_members(noise=0.1)
    flat = members.reshape(5, -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    unit = (flat - lo) / (hi - lo)
    ks = [1e-3, 0.01, 0.03, 0.1, 0.3, 1.0]
    squared = torch.stack([ensemble_objective(0.5 + k * (unit - 0.5)) for k in ks])
    agreement = torch.stack([ensemble_objective(0.5 + k * (unit - 0.5), regularizer_strength=0) for k in ks])
    rms = agreement.sqrt() + (squared - agreement)  # Eq. 4 as printed: RMS + lambda R
    assert rms.argmin() == 0  # the smallest k: collapse
    assert 0 < squared.argmin() < len(ks) - 1  # an interior minimum


def test_ensemble_rejects_a_constant_member():
    members = torch.stack([smooth_depth(0), torch.full((16, 16), 2.0, dtype=torch.float64)])
    with pytest.raises(DifflabError, match=r"member\(s\) \[1\] are constant"):
        ensemble_depth(members)


# --- metrics, Sec. 4.1 ---


def test_abs_rel_and_delta1_on_hand_computed_values():
    target = torch.tensor([[[1.0, 4.0], [2.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]])
    pred = torch.stack([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 1.2 * target[1]])
    # image 0: |errors| / target = 0, 2/4, 1/2, 0; ratios 1, 2, 1.5, 1.   image 1: all 0.2; ratios 1.2.
    torch.testing.assert_close(abs_rel(pred, target, reduction="none"), torch.tensor([0.25, 0.2]))
    torch.testing.assert_close(delta1(pred, target, reduction="none"), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(abs_rel(pred, target), torch.tensor(0.225))
    torch.testing.assert_close(delta1(pred, target), torch.tensor(0.75))
    mask = torch.tensor([[[True, False], [True, True]], [[True, True], [True, True]]])
    torch.testing.assert_close(abs_rel(pred, target, mask, reduction="none"), torch.tensor([0.5 / 3, 0.2]))
    torch.testing.assert_close(delta1(pred, target, mask, reduction="none"), torch.tensor([2 / 3, 1.0]))


def test_delta1_never_counts_a_non_positive_prediction():
    target = torch.ones(1, 2, 2)
    assert delta1(-target, target).item() == 0.0
    assert delta1(torch.zeros_like(target), target).item() == 0.0


def test_metrics_refuse_non_positive_target_depth():
    with pytest.raises(DifflabError, match="target depth 0 at a valid pixel"):
        abs_rel(torch.ones(1, 2, 2), torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]))


def test_pair_order_accuracy_on_three_objects():
    mask = torch.zeros(6, 6, dtype=torch.int32)
    mask[0:2, 0:2], mask[2:4, 2:4], mask[4:6, 4:6] = 1, 2, 3
    depth_of = torch.tensor([1.0, 0.2, 0.5, 0.8])  # background, then objects 1..3
    target = depth_of[mask.long()]
    assert pair_order_accuracy(3 * target + 1, target, mask) == 1.0  # any positive affine map keeps order
    swapped = torch.tensor([0.0, 0.5, 0.2, 0.8])[mask.long()]  # 1 and 2 swapped; 1-3 and 2-3 still right
    assert pair_order_accuracy(swapped, target, mask) == pytest.approx(2 / 3)
    assert pair_order_accuracy(1 - target, target, mask) == 0.0  # nearness mistaken for depth
    assert math.isnan(pair_order_accuracy(target, target, (mask == 1).int()))  # one object: no pair


# --- errors ---


@pytest.mark.parametrize("fn", [align_scale_shift, abs_rel, delta1])
def test_mismatched_shapes_name_both(fn):
    with pytest.raises(DifflabError, match=r"pred shape \(2, 4, 4\) and target shape \(2, 4, 5\) differ"):
        fn(torch.ones(2, 4, 4), torch.ones(2, 4, 5))


def test_mismatched_mask_and_instance_shapes_name_both():
    with pytest.raises(DifflabError, match=r"mask shape \(2, 3, 3\) and depth shape \(2, 4, 4\) differ"):
        normalize_depth(torch.ones(2, 4, 4), torch.ones(2, 3, 3, dtype=torch.bool))
    with pytest.raises(DifflabError, match=r"instance_mask shape \(3, 3\) and target shape \(4, 4\)"):
        pair_order_accuracy(torch.ones(4, 4), torch.ones(4, 4), torch.ones(3, 3, dtype=torch.int32))


def test_a_map_of_the_wrong_rank_is_refused():
    with pytest.raises(DifflabError, match=r"depth has shape \(2, 3, 4, 4\); expected \(B, H, W\)"):
        normalize_depth(torch.ones(2, 3, 4, 4))


# --- the sampler's one-step timestep, Garcia et al. (2025), Sec. 3 ---


def test_one_step_leading_spacing_tells_the_model_the_noise_is_clean():
    """Garcia et al. (2025, "Fine-tuning image-conditional diffusion models is easier than you think",
    Sec. 3): Marigold's one-step DDIM used 'leading' spacing, whose single timestep is t = 0 (1 with
    Stable Diffusion's steps_offset): the network is told its input is nearly clean while it is pure
    noise. 'trailing' starts at T - 1. difflab's sampler takes these by name
    (difflab.diffusion.discretization.SPACINGS)."""
    assert timestep_spacing(1000, 1, "leading").tolist() == [0]
    assert timestep_spacing(1000, 1, "leading", steps_offset=1).tolist() == [1]
    assert timestep_spacing(1000, 1, "trailing").tolist() == [999]
    schedule = make_schedule("scaled_linear")  # Stable Diffusion's, which Marigold fine-tunes
    leading, trailing = make_plan(schedule, 1, "leading"), make_plan(schedule, 1, "trailing")
    assert leading.level(0).alpha_bar > 0.99  # what the model is told: x_t is 99.9 % signal
    assert trailing.level(0).alpha_bar < 0.01  # what x_T ~ N(0, I) is: almost no signal


def test_level_pairs_are_left_out_of_the_order_within_the_gap():
    """Two objects 0.5 % apart in depth stand level at min_gap = 1 %: no order to score; at 0 they are ordered."""
    from difflab.models.depth_align import pair_order_counts

    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[0, :2], mask[3, 2:] = 1, 2
    target = torch.ones(4, 4)
    target[0, :2], target[3, 2:] = 0.500, 0.5025
    flipped = target.clone()
    flipped[0, :2] = 0.51
    assert pair_order_counts(flipped, target, mask, 0.01) == (0, 0)
    assert pair_order_counts(flipped, target, mask, 0.0) == (0, 1)
    assert pair_order_counts(target, target, mask, 0.0) == (1, 1)
