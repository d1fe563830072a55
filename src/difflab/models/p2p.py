"""Prompt-to-Prompt (Hertz et al. 2022): edit a generated image by editing its prompt, keeping what the
prompt does not change by injecting the source's attention maps into the edited prompt's pass.

Two passes share their starting noise, run as one batch [source; target]. In every cross-attention layer
the probabilities M = softmax(Q K^T / sqrt(d)) (pixels x prompt tokens) say where each word is drawn.
The edit function of Sec. 3.2 decides which maps the target pass uses at step t:

    Edit(M_t, M*_t, t) = M*_t  where the target's own maps are kept,  (M_t)_align  where the source's are injected

- **word swap** ('a red circle' -> 'a blue circle'): every map of the target is the source's while
  t < tau * T (Sec. 3.2, "Word swap"); after that the target's own maps refine the details;
- **refinement** ('a circle' -> 'a large circle'): tokens the two prompts share take the source's maps
  through an alignment of the token sequences (difflib's longest matching blocks), added tokens keep
  their own ("Adding a new phrase");
- **re-weighting** (the same prompt, one word's column scaled by c, Sec. 3.2 "Attention re-weighting"):
  the injected maps of that token are multiplied by c, as the authors' code does (no renormalisation);
- **self-attention injection**: the target's self-attention probabilities are the source's for the first
  ``tau_self`` of the steps (the authors' code, and later Plug-and-Play, Tumanyan et al. 2023);
- **the pooled prompt embedding** is the source's while the maps are (``P2PEdit.pooled``): this UNet, like
  SDXL's and unlike SD 1.x's, also reads its prompt through it, in every residual block;
- **LocalBlend** (Sec. 3.2 and Appendix): the maps of the blend words, in either pass, max-pooled,
  normalised to [0, 1] (min-max: see :meth:`AttentionEdit.blend_masks`) and thresholded, give a mask;
  outside it the target takes the source's sample. It is applied to the denoiser's predictions rather than
  to x_t (equal for DDIM, whose update depends on x_t only through them), from ``blend_start`` of the steps on.

On a layout-grounded run (LMD + GLIGEN, recipe 'layout') the source prompt is planned once and the target
is painted on the same layout, its objects' attribute words swapped as the prompt's are
(:func:`edited_layout`): the grounding, like the attention maps, comes from the source.

Only the conditional half of a guided batch is edited, as in the authors' code: the empty prompt's
pass is the same for both. With tau = 0, no self-injection and no blend the target row is the naive
baseline: the edited prompt regenerated with the same noise. The attention probabilities are computed
explicitly while editing (``MultiHeadAttention.probs_hook``); outside :func:`prompt_to_prompt` nothing changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.discretization import make_plan
from difflab.diffusion.samplers import sample_ddim
from difflab.diffusion.schedules import per_sample
from difflab.errors import DifflabError, check_float
from difflab.models.conditioners import GroundedPrompts, Layouts, TextPrompts, check_prompts
from difflab.models.inversion import Inversion, per_step_guidance
from difflab.models.recipe import run_sampler
from difflab.models.system import DiffusionSystem, ImageNoise
from difflab.nn.attention import MultiHeadAttention
from difflab.nn.controlnet import unet_of
from difflab.text.normalize import normalize
from difflab.world.prompts import plural
from difflab.world.scene import ALL_SHAPES, COLORS, SIZES, Scene


@dataclass(frozen=True)
class P2PEdit:
    """One edit: ``source`` prompt -> ``target`` prompt, and how much of the source's attention it keeps."""

    source: str
    target: str
    tau: float = 0.8
    """Fraction of the steps (from the noisiest) whose cross-attention maps are the source's (the
    authors' ``cross_replace_steps``, 0.8 in their word-swap examples)."""
    tau_self: float = 0.4
    """Fraction of the steps whose self-attention probabilities are the source's (``self_replace_steps``)."""
    blend: tuple[str, ...] = ()
    """LocalBlend's words (from either prompt): only where they are drawn may the target differ."""
    reweight: tuple[tuple[str, float], ...] = ()
    """(word of the target, c): that token's injected maps scaled by c."""
    threshold: float = 0.3
    """LocalBlend's threshold on the normalised maps (the authors' 0.3)."""
    blend_start: float = 0.2
    """Fraction of the steps before LocalBlend starts (the authors' ``start_blend``: early maps are noise)."""
    pooled: bool = True
    """Inject the source's pooled prompt embedding too, for the same first ``tau`` of the steps: this UNet
    (as SDXL's) adds it to the timestep embedding of every residual block, a path to the image that attention
    maps do not control (SD 1.x, the paper's model, has none)."""

    def __post_init__(self) -> None:
        for name in ("tau", "tau_self", "threshold", "blend_start"):
            check_float(name, getattr(self, name), 0.0, 1.0)
        for word, c in self.reweight:
            if not (isinstance(c, (int, float)) and math.isfinite(c) and 0 <= c <= 10):
                raise DifflabError(f"re-weighting {c!r} of '{word}' is invalid; expected a number in [0, 10]")


def naive(edit: P2PEdit) -> P2PEdit:
    """The baseline: the target prompt regenerated from the same noise, with nothing of the source kept."""
    return P2PEdit(edit.source, edit.target, tau=0.0, tau_self=0.0, pooled=False)


# ----------------------------------------------------------------------------------------- tokens


def _tokens(tokenizer, text: str) -> list[int]:
    """The ids of a text's own tokens (no <bos>, <eos> or padding)."""
    ids, mask = tokenizer.encode([text])
    return ids[0, 1 : int(mask[0].sum()) - 1].tolist()


def alignment(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token position j of the target's sequence, the source position whose map it takes and
    whether it takes one: ``(mapper (L,) long, aligned (L,) bool)``. Matching blocks of the two token
    sequences map one to one; a replaced run of equal length maps position by position (a word swap);
    tokens only the target has are not aligned. <bos> and <eos> map to each other; padding to itself."""
    src, tgt = _tokens(tokenizer, source), _tokens(tokenizer, target)
    length = tokenizer.encode([""])[0].shape[1]
    mapper, aligned = torch.arange(length), torch.zeros(length, dtype=torch.bool)
    aligned[0] = True  # <bos>
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, src, tgt, autojunk=False).get_opcodes():
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):
            mapper[1 + j1 : 1 + j2] = torch.arange(1 + i1, 1 + i2)
            aligned[1 + j1 : 1 + j2] = True
    mapper[1 + len(tgt)], aligned[1 + len(tgt)] = 1 + len(src), True  # <eos>
    return mapper, aligned


def word_positions(tokenizer, text: str, word: str) -> list[int]:
    """Positions (in the encoded sequence, <bos> at 0) of the tokens of ``word`` wherever it occurs in ``text``."""
    toks, pieces = _tokens(tokenizer, text), _tokens(tokenizer, word)
    if not pieces:
        raise DifflabError(f"'{word}' has no tokens; expected a word of the prompt")
    found = [1 + i + k for i in range(len(toks) - len(pieces) + 1) if toks[i : i + len(pieces)] == pieces
             for k in range(len(pieces))]  # fmt: skip
    return found


def swapped_words(source: str, target: str) -> list[tuple[str, str]]:
    """The (old, new) word pairs a target prompt swaps in the source, position by position."""
    return [(old, new) for _, old, new in _swaps(source, target)]


def _swaps(source: str, target: str) -> list[tuple[int, str, str]]:
    """(index in the source's words, old, new) of each swapped word."""
    src, tgt = normalize(source), normalize(target)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, src, tgt, autojunk=False).get_opcodes():
        if op == "replace" and i2 - i1 == j2 - j1:
            out += [(i1 + k, src[i1 + k], tgt[j1 + k]) for k in range(i2 - i1)]
    return out


_VALUES = {"color": {c: c for c in COLORS}, "size": {z: z for z in SIZES},
           "shape": {s: s for s in ALL_SHAPES} | {plural(s): s for s in ALL_SHAPES}}  # fmt: skip


def _attribute(word: str) -> tuple[str, str] | None:
    """('color', 'red') for 'red', ('shape', 'circle') for 'circles'; None for other words."""
    return next(((a, v[word]) for a, v in _VALUES.items() if word in v), None)


def edited_layout(scene: Scene, source: str, target: str) -> Scene:
    """The source's planned layout with the target's swaps of colour, shape and size words applied to the
    objects the swapped word's mention describes ('a red circle and a red square' -> 'a red circle and a blue
    square': the red squares turn blue, in their boxes; a size swap changes a box around the same centre).
    A mention is the run of words between 'and's and commas; its other attribute words pick its objects.
    Other changes are left to the prompt."""
    words, objects = normalize(source), list(scene.objects)
    for index, old, new in _swaps(source, target):
        was, now = _attribute(old), _attribute(new)
        if was is None or now is None or was[0] != now[0]:
            continue
        lo, hi = index, index
        while lo > 0 and words[lo - 1] not in ("and", ","):
            lo -= 1
        while hi + 1 < len(words) and words[hi + 1] not in ("and", ","):
            hi += 1
        mention = [a for w in words[lo : hi + 1] if (a := _attribute(w)) is not None]  # includes (attr, old)
        objects = [dataclasses.replace(o, **{now[0]: now[1]}) if all(getattr(o, a) == v for a, v in mention) else o
                   for o in objects]  # fmt: skip
    return dataclasses.replace(scene, objects=tuple(objects))


# ------------------------------------------------------------------------------------- the controller


class AttentionEdit:
    """The attention hooks of one batch of ``n`` edits: rows [sources; targets] (then the guided batch's
    unconditional half, left alone). ``step`` is set before each network call."""

    def __init__(self, edits: list[P2PEdit], tokenizer, steps: int, latent_side: int):
        n = len(edits)
        self.n, self.steps, self.side, self.step = n, steps, latent_side, 0
        pairs = [alignment(tokenizer, e.source, e.target) for e in edits]
        self.mapper = torch.stack([m for m, _ in pairs])  # (n, L)
        self.aligned = torch.stack([a for _, a in pairs])  # (n, L)
        self.weights = torch.ones(self.mapper.shape, dtype=torch.float32)  # (n, L)
        self.blend = torch.zeros(2 * n, self.mapper.shape[1], dtype=torch.bool)  # (2n, L): blend words per row
        for k, e in enumerate(edits):
            for word, c in e.reweight:
                where = word_positions(tokenizer, e.target, word)
                if not where:
                    raise DifflabError(f"re-weighted word '{word}' is not in the target prompt '{e.target}'")
                self.weights[k, where] = float(c)
            for word in e.blend:
                src, tgt = word_positions(tokenizer, e.source, word), word_positions(tokenizer, e.target, word)
                if not src and not tgt:
                    raise DifflabError(f"blend word '{word}' is in neither '{e.source}' nor '{e.target}'")
                self.blend[k, src], self.blend[n + k, tgt] = True, True
        self.cross_steps = torch.tensor([round(e.tau * steps) for e in edits])
        self.self_steps = torch.tensor([round(e.tau_self * steps) for e in edits])
        self.blend_from = torch.tensor([round(e.blend_start * steps) if e.blend else steps for e in edits])
        self.threshold = torch.tensor([e.threshold for e in edits])
        self.pooled = torch.tensor([e.pooled for e in edits])
        self._maps: list[torch.Tensor] = []

    # -- hooks: probs (B, heads, N, L) for cross-attention, (B, heads, N, N) for self-attention; B >= 2n

    def cross(self, probs: torch.Tensor) -> torch.Tensor:
        n = self.n
        src, tgt = probs[:n], probs[n : 2 * n]
        dev = probs.device
        index = self.mapper.to(dev)[:, None, None, :].expand(-1, *src.shape[1:3], -1)  # (n, heads, N, L)
        injected = src.gather(-1, index) * self.weights.to(dev, probs.dtype)[:, None, None, :]
        now = (self.step < self.cross_steps).to(dev)[:, None, None, None]
        new = torch.where(now & self.aligned.to(dev)[:, None, None, :], injected, tgt)
        cond = torch.cat([src, new])  # (2n, heads, N, L)
        if self.blend.any():
            self._maps.append(cond.mean(dim=1))  # (2n, N, L), averaged over heads
        return torch.cat([cond, probs[2 * n :]])

    def self_attention(self, probs: torch.Tensor) -> torch.Tensor:
        n = self.n
        now = (self.step < self.self_steps).to(probs.device)[:, None, None, None]
        tgt = torch.where(now, probs[:n], probs[n : 2 * n])
        return torch.cat([probs[:n], tgt, probs[2 * n :]])

    @contextlib.contextmanager
    def installed(self, network: torch.nn.Module):
        """Hook every attention layer of the network's UNet (not the text refiner's) while inside."""
        unet = unet_of(network)
        hooked = []
        for name, m in unet.named_modules():
            if isinstance(m, MultiHeadAttention) and name.endswith(("cross_attn", "self_attn")):
                m.probs_hook = self.cross if name.endswith("cross_attn") else self.self_attention
                hooked.append(m)
        if not any(name.endswith("cross_attn") for name, _ in unet.named_modules()):
            raise DifflabError("this network has no cross-attention to edit (Prompt-to-Prompt needs a UNet that "
                               "reads its prompt through cross-attention)")  # fmt: skip
        try:
            yield self
        finally:
            for m in hooked:
                m.probs_hook = None

    # -- LocalBlend

    def blend_masks(self) -> torch.Tensor | None:
        """(n, 1, side, side) masks from the maps of this call's layers (then forgotten), or None."""
        maps, self._maps = self._maps, []
        if not maps:
            return None
        side = self.side
        per_layer = []
        for m in maps:  # (2n, N, L), N = h * w of that layer
            hw = int(round(m.shape[1] ** 0.5))
            words = (m * self.blend.to(m.device, m.dtype)[:, None, :]).sum(-1)  # (2n, N): the blend words' mass
            words = words.reshape(-1, 1, hw, hw)  # (2n, 1, h, w)
            per_layer.append(F.interpolate(words.float(), size=(side, side), mode="bilinear", align_corners=False))
        words = torch.stack(per_layer).mean(0)  # (2n, 1, side, side)
        words = F.max_pool2d(words, 3, stride=1, padding=1)  # the authors' k = 1 dilation of the map
        # min-max, where the authors divide by the max alone: over a prompt of 4-8 tokens every pixel gives
        # every word a share (a word's mass spans about 0.1-0.4 here, against ~0-1 over SD's 77 tokens), so
        # max-normalised maps cleared the threshold everywhere and the mask covered the whole image
        low, high = words.flatten(1).amin(1), words.flatten(1).amax(1)  # (2n,)
        words = (words - low[:, None, None, None]) / (high - low).clamp_min(1e-12)[:, None, None, None]
        mask = words > self.threshold.to(words.device)[:, None, None, None].repeat(2, 1, 1, 1)
        return (mask[: self.n] | mask[self.n :]).float()  # the union of the source's and the target's


def _edited_denoiser(denoiser, control: AttentionEdit, timesteps: list[int]):
    """Wrap a (guided) denoiser over the batch [sources; targets]: tell the controller the step, then apply
    LocalBlend to the targets' predictions: outside the mask they are the sources'."""

    def edited(x: torch.Tensor, t, **cond):
        now = int(per_sample(t, x.shape[0])[0])
        control.step = sum(1 for s in timesteps if s > now)  # the plan's index of t (its next step for a mid-step t)
        n = control.n
        if cond.get("pooled") is not None:
            inject = ((control.step < control.cross_steps) & control.pooled).to(x.device)[:, None]  # (n, 1)
            pooled = cond["pooled"]  # (2n, E): [sources; targets]
            cond = cond | {"pooled": torch.cat([pooled[:n], torch.where(inject, pooled[:n], pooled[n:])])}
        eps, x0 = denoiser(x, t, **cond)
        masks = control.blend_masks()
        if masks is not None:  # edits without blend words start at the last step + 1: never
            on = (control.step >= control.blend_from).to(x.device)[:, None, None, None]
            m = torch.where(on, masks.to(x.dtype), torch.ones_like(masks, dtype=x.dtype))  # (n, 1, side, side)
            eps = torch.cat([eps[:n], eps[:n] + m * (eps[n:] - eps[:n])])
            x0 = torch.cat([x0[:n], x0[:n] + m * (x0[n:] - x0[:n])])
        return eps, x0

    return edited


# --------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def prompt_to_prompt(system: DiffusionSystem, cfg, edits: list[P2PEdit], *, seed: int = 0, sampler=None,
                     steps=None, cfg_scale=None, spacing=None, progress: bool = False, replan: bool = False,
                     inversion: Inversion | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The source images and the edited images (each (n, C, H, W) in [-1, 1]) of ``edits`` on a text-to-image
    run. Edit k draws its noise from the generator of image k of a request sampled in parts
    (:class:`~difflab.models.system.ImageNoise` with ``seed``), shared by its two passes. ``replan`` (layout
    runs): plan the target's layout afresh instead of editing the source's, as a user who only changes the
    prompt gets it (the naive baseline there).

    ``inversion`` (:class:`~difflab.models.inversion.Inversion`): edit a given image instead: every source is
    the inverted image's prompt, both passes start from its z*_0 and are guided with its per-step null
    conditions, by DDIM at its steps and guidance (the sampling arguments must then be left out)."""
    if not edits:
        raise DifflabError("no edits given; expected at least one (source, target) pair")
    conditioner = system.conditioner
    if not isinstance(conditioner, TextPrompts):
        raise DifflabError(f"Prompt-to-Prompt edits a text-to-image model; this one has a "
                           f"{type(conditioner).__name__} conditioner")  # fmt: skip
    sources, targets = [e.source for e in edits], [e.target for e in edits]
    check_prompts(sources)
    check_prompts(targets)
    n = len(edits)
    device = next(system.network.parameters()).device
    if inversion is not None:
        return _edit_inverted(system, cfg, edits, inversion, (sampler, steps, cfg_scale, spacing), device)
    s = cfg.sample.resolve(sampler, steps, cfg_scale, spacing)
    plan = make_plan(cfg.diffusion.make_schedule(), s.steps, s.spacing)
    control = AttentionEdit(edits, conditioner.encoder.tokenizer, s.steps, cfg.unet.image_size)
    scenes = conditioner.plan(sources, seed).scenes if isinstance(conditioner, GroundedPrompts) else None
    replanned = conditioner.plan(targets, seed).scenes if scenes is not None and replan else None
    cond, null = conditioner.condition(_request(edits, scenes, replanned), 2 * n, device, seed=seed)
    noise = ImageNoise(seed, [*range(n), *range(n)])  # the same generator for an edit's two passes

    def wrap(denoiser):
        return _edited_denoiser(denoiser, control, [int(t) for t in plan.timesteps])

    with control.installed(system.network):
        x = run_sampler(system.network, cfg, 2 * n, cond, null, sampler=s.sampler, steps=s.steps,
                        cfg_scale=s.cfg_scale, spacing=s.spacing, noise=noise, progress=progress,
                        wrap=wrap)  # fmt: skip
    images = system.codec.decode(x)
    return images[:n], images[n:]


def _request(edits: list[P2PEdit], scenes: list[Scene] | None, replanned: list[Scene] | None = None):
    """[sources; targets], with their layouts on a layout run: the sources' plans, and for the targets the
    same plans edited (or ``replanned``)."""
    texts = [e.source for e in edits] + [e.target for e in edits]
    if scenes is None:
        return texts
    edited = [edited_layout(sc, e.source, e.target) for sc, e in zip(scenes, edits, strict=True)]
    return Layouts(texts, [*scenes, *(replanned or edited)])


def _edit_inverted(system, cfg, edits, inversion, sampling, device):
    """:func:`prompt_to_prompt` of an inverted image (its ``inversion``)."""
    if any(v is not None for v in sampling):
        raise DifflabError("an inverted image is redrawn by DDIM at the steps and guidance it was inverted with; "
                           "expected no sampler, steps, guidance or spacing")  # fmt: skip
    request = inversion.request
    prompt = request.prompts[0] if isinstance(request, Layouts) else request[0]
    if any(e.source != prompt for e in edits):
        raise DifflabError(f"an edit's source must be the inverted image's prompt '{prompt}'; got "
                           f"{sorted({e.source for e in edits})}")  # fmt: skip
    n = len(edits)
    schedule = cfg.diffusion.make_schedule()
    plan = make_plan(schedule, inversion.steps, inversion.spacing)
    control = AttentionEdit(edits, system.conditioner.encoder.tokenizer, inversion.steps, cfg.unet.image_size)
    scenes = list(request.scenes) * n if isinstance(request, Layouts) else None
    cond, _ = system.conditioner.condition(_request(edits, scenes), 2 * n, device)
    guided = per_step_guidance(Denoiser(system.network, schedule, cfg.diffusion.prediction), inversion.cfg_scale,
                               inversion.nulls, lambda: control.step)  # fmt: skip
    x_T = inversion.latents[:1].expand(2 * n, *inversion.latents.shape[1:])
    with control.installed(system.network):
        x = sample_ddim(_edited_denoiser(guided, control, [int(t) for t in plan.timesteps]), x_T, schedule,
                        inversion.steps, spacing=inversion.spacing, cond=cond)  # fmt: skip
    images = system.codec.decode(x)
    return images[:n], images[n:]
