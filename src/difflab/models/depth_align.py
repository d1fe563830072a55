r"""The math around a diffusion depth estimator: Marigold (Ke et al., CVPR 2024, "Repurposing
Diffusion-Based Image Generators for Monocular Depth Estimation").

Marigold predicts *affine-invariant* depth: a map known up to an unknown scale and shift per image. Four
pieces of math surround the network, each a pure function here:

1. **Normalisation** (Eq. 3, training targets): d̃ = ((d - d2) / (d98 - d2) - 0.5) x 2, with d2, d98 the
   image's 2 % and 98 % percentiles, so that most of d̃ lies in [-1, 1], the range of the VAE's input.
2. **Alignment** (Sec. 4.1, evaluation): the prediction is fitted to the ground truth by least squares,
   argmin_{s,t} sum (s d̂ + t - d)^2, before any metric is taken.
3. **Test-time ensembling** (Sec. 3.3, Eq. 4): N predictions from different noise draws are aligned to
   each other by a scale and shift each, merged by the pixel-wise median, their spread an uncertainty.
4. **Metrics** (Sec. 4.1): AbsRel and delta1, plus the pairwise depth order of a scene's objects.

Convention: depth is distance from the camera, larger is farther (as the toy world renders it,
:class:`difflab.world.render.Rendering`). Every positive affine map keeps that order.

Glossary (paper symbol -> name here):

    d, d̂          depth, a prediction                         target, pred      (B, H, W) or (B, 1, H, W)
    d2, d98       per-image 2 % and 98 % percentiles          percentiles       two (B,) tensors
    s, t          scale and shift                             scale, shift      (B,) or (N,)
    d̂'_i          member i after alignment, s_i d̂_i + t_i     aligned           (N, H*W)
    m             merged map, pixel-wise median of the d̂'_i   merged
    R             |min m - 0| + |1 - max m|, the range term   (in ensemble_objective)
"""

from __future__ import annotations

import math

import torch

from difflab.diffusion.schedules import append_dims
from difflab.errors import DifflabError, check_choice, check_float, check_int

MERGES = ("median", "mean")
REDUCTIONS = ("mean", "none")


def _pixels(x: torch.Tensor, name: str) -> torch.Tensor:
    """A batch of maps, (B, H, W) or (B, 1, H, W), as (B, H*W)."""
    if x.ndim == 3 or (x.ndim == 4 and x.shape[1] == 1):
        return x.reshape(x.shape[0], -1)  # (B, H*W)
    raise DifflabError(f"{name} has shape {tuple(x.shape)}; expected (B, H, W) or (B, 1, H, W)")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise DifflabError(
            f"{names[0]} shape {tuple(a.shape)} and {names[1]} shape {tuple(b.shape)} differ; "
            "expected the same shape"
        )


def _valid(mask: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor:
    """The (B, H*W) bool mask of valid pixels (all of them without a mask); every image keeps one."""
    if mask is None:
        return torch.ones(_pixels(like, name).shape, dtype=torch.bool, device=like.device)
    _check_same_shape(mask, like, ("mask", name))
    valid = _pixels(mask, "mask") != 0
    empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise DifflabError(f"mask leaves image(s) {empty} without a valid pixel; expected at least one each")
    return valid


def normalize_depth(
    depth: torch.Tensor, mask: torch.Tensor | None = None, low: float = 0.02, high: float = 0.98
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Affine-invariant normalisation, Eq. 3 of Ke et al. (2024): d̃ = ((d - d2) / (d98 - d2) - 0.5) x 2.

    d2 and d98 are each image's ``low`` and ``high`` quantiles (linear interpolation, as ``torch.quantile``
    and numpy's default), taken over the valid pixels where ``mask`` is given; every pixel, valid or not,
    goes through the same map. The percentiles land on -1 and 1 and the result does not change under
    d -> a d + b with a > 0, which is what lets one network learn depth of any scene scale. A *flat*
    image (d98 == d2 over its valid pixels) has no relative depth to show and maps to 0, the middle of
    the range, everywhere, with no division by zero; :func:`denormalize_depth` still inverts it.

    Returns the normalised maps (``depth``'s shape) and ``(d2, d98)``, each (B,).
    """
    check_float("low", low, 0, 1)
    check_float("high", high, 0, 1)
    if not low < high:
        raise DifflabError(f"quantiles low={low} and high={high} are invalid; expected low < high")
    flat = _pixels(depth, "depth")
    valid = _valid(mask, depth, "depth")
    # nanquantile skips the NaNs put in place of invalid pixels: per-image quantiles of the valid ones.
    q = torch.tensor([low, high], dtype=flat.dtype, device=flat.device)
    d2, d98 = torch.nanquantile(flat.masked_fill(~valid, float("nan")), q, dim=1)  # two (B,)
    span = append_dims(d98 - d2, depth.ndim)
    flat_image = span == 0
    normalized = ((depth - append_dims(d2, depth.ndim)) / torch.where(flat_image, 1, span) - 0.5) * 2
    return torch.where(flat_image, 0, normalized), (d2, d98)


def denormalize_depth(
    normalized: torch.Tensor, percentiles: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Inverse of :func:`normalize_depth` given its ``(d2, d98)``: d = (d̃ / 2 + 0.5)(d98 - d2) + d2."""
    d2, d98 = (append_dims(p, normalized.ndim) for p in percentiles)
    return (normalized / 2 + 0.5) * (d98 - d2) + d2


def align_scale_shift(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares scale and shift per image, argmin_{s,t} sum_valid (s pred + t - target)^2: how Ke et
    al. (2024, Sec. 4.1) align affine-invariant predictions to the ground truth before the metrics.

    The normal equations [[sum p^2, sum p], [sum p, n]] [s, t]^T = [sum p d, sum d]^T are solved by
    eliminating t = mean(d) - s mean(p), which leaves s = cov(p, d) / var(p): the same solution, computed
    about the means (in float64) so that sum p^2 - n mean(p)^2 does not cancel away in float32. Where
    ``pred`` is constant over the valid pixels every s fits equally well; s = 0, t = mean(d) is returned.
    Pixels outside ``mask`` take no part in the fit (they may hold NaN) but are aligned all the same.

    Returns ``(aligned, scale, shift)``: ``s pred + t`` in ``pred``'s shape and dtype, and two (B,).
    """
    _check_same_shape(pred, target, ("pred", "target"))
    p, d = _pixels(pred, "pred").double(), _pixels(target, "target").double()  # (B, H*W)
    valid = _valid(mask, pred, "pred")
    n = valid.sum(dim=1)

    def valid_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, 0).sum(dim=1) / n  # where, not *: 0 * NaN would be NaN

    p_bar, d_bar = valid_mean(p), valid_mean(d)
    var = valid_mean((p - p_bar[:, None]) ** 2)
    cov = valid_mean((p - p_bar[:, None]) * (d - d_bar[:, None]))
    scale = torch.where(var > 0, cov / torch.where(var > 0, var, 1), 0)
    shift = d_bar - scale * p_bar
    aligned = append_dims(scale, pred.ndim) * pred.double() + append_dims(shift, pred.ndim)
    return aligned.to(pred.dtype), scale.to(pred.dtype), shift.to(pred.dtype)


def _merge(aligned: torch.Tensor, merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-wise merge of (N, P) aligned members -> (merged, spread), each (P,): the median with the median
    absolute deviation, or the mean with the standard deviation (N - 1 in the denominator), as the
    reference code pairs them. The median is the true one (the mean of the middle two for even N)."""
    if merge == "median":
        merged = torch.quantile(aligned, 0.5, dim=0)
        return merged, torch.quantile((aligned - merged).abs(), 0.5, dim=0)
    return aligned.mean(dim=0), aligned.std(dim=0)


def ensemble_objective(
    aligned: torch.Tensor, regularizer_strength: float = 0.02, merge: str = "median"
) -> torch.Tensor:
    r"""The test-time ensembling cost of Ke et al. (2024, Sec. 3.3, Eq. 4) for (N, P) aligned members:

        mean over pairs i < j and pixels of (d̂'_i - d̂'_j)^2  +  \lambda (|min m - 0| + |1 - max m|)

    with m the pixel-wise merge (median or mean) of the members. The first term pulls the members together; R keeps m on
    [0, 1], which also fixes the common scale and shift that the first term leaves free.

    Eq. 4 takes the square root of the first term (an RMS). We do not: the RMS and R both grow linearly
    with a common scale k of all members, so when members disagree by more than \lambda x range(m) in RMS
    (a few percent at \lambda = 0.02), shrinking everything lowers the cost and the minimum is the
    collapse s_i -> 0; the reference code escapes it only by stopping BFGS after a few iterations. The
    squared term grows as k^2 against R's k, so the minimum keeps a finite scale for any noise.
    """
    n = aligned.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)  # the N(N-1)/2 pairs i < j
    agreement = (aligned[i] - aligned[j]).square().mean()
    merged, _ = _merge(aligned, merge)
    return agreement + regularizer_strength * ((0 - merged.min()).abs() + (1 - merged.max()).abs())


def align_members(
    members: torch.Tensor,
    *,
    merge: str = "median",
    regularizer_strength: float = 0.02,
    steps: int = 200,
    lr: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and shifts (N,) that align N affine-invariant depth maps of one image, (N, H, W) or
    (N, 1, H, W), to each other: argmin of :func:`ensemble_objective` over s_i > 0, t_i.

    Start (as the reference code does): each member min-max normalised to [0, 1], s_i = 1 / (max - min),
    t_i = -s_i min. From there member i is exp(u_i) x̂_i + v_i, x̂_i its [0, 1] start, so the scale stays
    positive (a flipped member would swap near and far) and a step of ``lr`` means the same fraction of
    the depth range for any input units. Optimiser: Adam on the 2N numbers u, v, ``steps`` steps with the
    learning rate annealed to 0 on a cosine, in float64. The objective is only piecewise smooth (the
    median, min and max switch between pixels and members), where the curvature model and Wolfe line
    search of BFGS/L-BFGS (the reference uses scipy's BFGS) stall at kinks; Adam's sign-like
    steps cross kinks and the annealing lets it settle. Adam does not descend monotonically, though: near
    a kink it steps by about ``lr`` however small the gradient, so the lowest-cost iterate seen (the start
    included) is returned, not the last. Identical or exactly affine copies start at the minimum (cost 0)
    and come back unmoved.
    """
    scale, shift = _fit_members(_pixels(members, "members").double(), merge, regularizer_strength, steps, lr)
    return scale.to(members.dtype), shift.to(members.dtype)


def _fit_members(
    flat: torch.Tensor, merge: str, regularizer_strength: float, steps: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_members` on (N, H*W) float64 members."""
    check_choice("merge", merge, MERGES)
    check_float("regularizer_strength", regularizer_strength, 0)
    check_int("steps", steps, 0)
    check_float("lr", lr, 0, lo_open=True)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    flat_members = (hi == lo).nonzero().flatten().tolist()
    if flat_members:
        raise DifflabError(
            f"ensemble member(s) {flat_members} are constant; expected depth maps with at least two values"
        )
    # Divided, not multiplied by 1 / (hi - lo): each member's extremes land on exactly 0 and 1, so copies
    # that agree start with R = 0 exactly, where |.| has zero gradient and Adam has nothing to amplify.
    unit = (flat - lo[:, None]) / (hi - lo)[:, None]  # (N, H*W), each member on [0, 1]
    with torch.enable_grad():  # an optimisation, also when the caller samples under torch.no_grad()
        u = torch.zeros(flat.shape[0], dtype=torch.float64, requires_grad=True)
        v = torch.zeros(flat.shape[0], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([u, v], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
        best_cost, best_u, best_v = math.inf, u.detach().clone(), v.detach().clone()
        for step in range(steps + 1):  # the cost at the start and after each of the `steps` updates
            optimizer.zero_grad()
            cost = ensemble_objective(u.exp()[:, None] * unit + v[:, None], regularizer_strength, merge)
            if cost.item() < best_cost:
                best_cost, best_u, best_v = cost.item(), u.detach().clone(), v.detach().clone()
            if step == steps:
                break
            cost.backward()
            optimizer.step()
            schedule.step()
    scale = best_u.exp() / (hi - lo)  # exp(u) (d - lo) / (hi - lo) + v = s d + t
    return scale, best_v - scale * lo  # float64, whatever the members' dtype


def ensemble_depth(
    members: torch.Tensor,
    *,
    merge: str = "median",
    regularizer_strength: float = 0.02,
    steps: int = 200,
    lr: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time ensembling, Ke et al. (2024, Sec. 3.3): merge N affine-invariant depth maps of one image.

    1. Align the members to each other (:func:`align_members`, Eq. 4).
    2. Merge them pixel-wise: the median (the paper) or the mean; the uncertainty is their median absolute
       deviation or standard deviation.
    3. Map the merged map affinely onto exactly [0, 1] (min to 0, max to 1), the uncertainty by the same
       scale, as the reference code ends.

    ``members`` is (N, H, W) or (N, 1, H, W); both results have one member's shape. N identical members
    come back as that member mapped onto [0, 1]. N = 1 is returned unchanged with zero uncertainty: there
    is nothing to align, and Marigold's pipelines skip ensembling for an ensemble of one.
    """
    check_choice("merge", merge, MERGES)
    flat = _pixels(members, "members")  # (N, H*W)
    if flat.shape[0] == 1:
        return members[0].clone(), torch.zeros_like(members[0])
    flat = flat.double()
    scale, shift = _fit_members(flat, merge, regularizer_strength, steps, lr)
    aligned = scale[:, None] * flat + shift[:, None]  # (N, H*W)
    merged, spread = _merge(aligned, merge)
    span = merged.max() - merged.min()
    span = torch.where(span > 0, span, 1)
    merged, spread = (merged - merged.min()) / span, spread / span
    shape = members.shape[1:]
    return merged.reshape(shape).to(members.dtype), spread.reshape(shape).to(members.dtype)


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    check_choice("reduction", reduction, REDUCTIONS)
    return per_image.mean() if reduction == "mean" else per_image


def _metric_inputs(pred, target, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pred, target, valid) as (B, H*W), with every valid target depth checked to be positive."""
    _check_same_shape(pred, target, ("pred", "target"))
    p, d = _pixels(pred, "pred"), _pixels(target, "target")
    valid = _valid(mask, target, "target")
    bad = d[valid & ~(d > 0)]
    if bad.numel():
        raise DifflabError(
            f"target depth {bad[0].item():g} at a valid pixel; expected depth > 0 (mask out pixels without it)"
        )
    return p, torch.where(valid, d, 1), valid  # invalid targets set to 1 so no division makes inf or NaN


def abs_rel(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *, reduction: str = "mean"
) -> torch.Tensor:
    """Absolute relative error, mean over valid pixels of |pred - target| / target (Ke et al. 2024, Sec.
    4.1), per image; ``reduction="mean"`` averages the images (as the paper averages over a dataset),
    ``"none"`` returns (B,). Give ``pred`` aligned to the target first (:func:`align_scale_shift`)."""
    p, d, valid = _metric_inputs(pred, target, mask)
    per_image = torch.where(valid, (p - d).abs() / d, 0).sum(dim=1) / valid.sum(dim=1)
    return _reduce(per_image, reduction)


def delta1(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *, reduction: str = "mean"
) -> torch.Tensor:
    """delta1 accuracy, the fraction of valid pixels with max(pred / target, target / pred) < 1.25 (Ke et
    al. 2024, Sec. 4.1), per image, reduced as in :func:`abs_rel`. A pixel with pred <= 0 never counts:
    its ratios are negative or infinite, and a negative pair would pass the test."""
    p, d, valid = _metric_inputs(pred, target, mask)
    positive = p > 0
    p_safe = torch.where(positive, p, 1)
    ratio = torch.maximum(p_safe / d, d / p_safe)
    hits = valid & positive & (ratio < 1.25)
    return _reduce(hits.sum(dim=1) / valid.sum(dim=1), reduction)


def pair_order_counts(
    pred: torch.Tensor, target: torch.Tensor, instance_mask: torch.Tensor, min_gap: float = 0.0
) -> tuple[int, int]:
    """How often a prediction orders a scene's objects in depth as the truth does: ``(right, pairs)``.

    ``instance_mask`` (H, W) holds object ids > 0 (0 is background). Each object's depth is the median of
    its pixels, in ``pred`` and in ``target`` (H, W); for every pair of objects the predicted order (which
    is nearer, i.e. has the smaller depth) is right when it matches the truth's. Pairs the truth puts at
    equal depth - within ``min_gap`` of the nearer one's depth (0: exactly equal) - have no order to get
    right and are left out; a predicted tie on an ordered pair counts as wrong. Any positive affine map of
    ``pred`` leaves the answer unchanged, so no alignment is needed.
    """
    _check_same_shape(pred, target, ("pred", "target"))
    _check_same_shape(instance_mask, target, ("instance_mask", "target"))
    check_float("min_gap", min_gap, 0)
    if pred.ndim != 2:
        raise DifflabError(f"pred has shape {tuple(pred.shape)}; expected one map (H, W)")
    ids = [i for i in instance_mask.unique().tolist() if i > 0]
    if len(ids) < 2:
        return 0, 0
    pred_depth = torch.stack([pred[instance_mask == i].double().quantile(0.5) for i in ids])  # (K,)
    true_depth = torch.stack([target[instance_mask == i].double().quantile(0.5) for i in ids])  # (K,)
    a, b = torch.triu_indices(len(ids), len(ids), offset=1)  # every pair of objects once
    gap = true_depth[a] - true_depth[b]
    ordered = gap.abs() > min_gap * torch.minimum(true_depth[a], true_depth[b])
    right = pred_depth[a] - pred_depth[b]
    return int((right.sign() == gap.sign())[ordered & (gap != 0)].sum()), int((ordered & (gap != 0)).sum())


def pair_order_accuracy(pred: torch.Tensor, target: torch.Tensor, instance_mask: torch.Tensor,
                        min_gap: float = 0.0) -> float:  # fmt: skip
    """The fraction of a scene's ordered object pairs a prediction orders right (:func:`pair_order_counts`),
    or NaN when there are none (fewer than two objects, or all level)."""
    right, pairs = pair_order_counts(pred, target, instance_mask, min_gap)
    return right / pairs if pairs else float("nan")
