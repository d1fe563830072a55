"""Word swaps judged exactly: did the edit change the named attribute, and did everything else stay?

A case is a source prompt of one or two objects ('a red circle', 'a large red circle and a blue square')
and the same prompt with one attribute word of one object swapped: its colour, its shape, or its size
('a red circle' -> 'a blue circle'). The source image is generated, then edited by Prompt-to-Prompt
(:mod:`difflab.models.p2p`) and by the naive baseline (the edited prompt from the same noise). The reader
reads all three, and a case is judged when the source image holds its prompt and one object of it matches
the edited phrase (the object O; edits of a drawing that failed its prompt say nothing about the editor).
Then, with O' = O with the attribute swapped:

- **changed**: the object in O's cell has the new value;
- **kept**: O's cell holds one object, equal to O in every other attribute, and every other cell holds what
  the source's holds (nothing moved, appeared, vanished or changed);
- **exact**: both: the edited image reads as the source scene with O replaced by O';
- **psnr outside**: the PSNR (dB, pixels in [0, 1]) between source and edited image away from O (beyond
  1.5 radii of the larger of its two sizes from its centre): the pixels nobody asked to change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.errors import DifflabError
from difflab.models.p2p import P2PEdit, naive, prompt_to_prompt
from difflab.models.vae import psnr as vae_psnr
from difflab.world.prompts import Conjunction, ObjectSpec, matches
from difflab.world.reader import read
from difflab.world.scene import Obj, Scene, WorldConfig

EVAL_SEED = 80_001
"""The seed of the evaluation's cases (its noise seed is the sampling seed, 0 by default)."""
KINDS = ("color", "shape", "size")


@dataclass(frozen=True)
class SwapCase:
    source: Conjunction
    part: int
    """Which object of the source the swap edits."""
    attribute: str
    new: str

    @property
    def old(self) -> str:
        return getattr(self.source.parts[self.part], self.attribute)

    @property
    def target(self) -> Conjunction:
        parts = list(self.source.parts)
        spec = parts[self.part]
        parts[self.part] = ObjectSpec(**(spec.to_dict() | {self.attribute: self.new}))
        return Conjunction(tuple(parts))

    def edit(self, **settings) -> P2PEdit:
        """The Prompt-to-Prompt edit of this case; with ``blend=True``, LocalBlend on the swapped words."""
        blend = settings.pop("blend", False)
        words = (self.old, self.new) if blend else ()
        return P2PEdit(self.source.text(), self.target.text(), blend=words, **settings)


def swap_cases(world: WorldConfig, n: int, seed: int = EVAL_SEED) -> list[SwapCase]:
    """``n`` cases: sources of one object (colour and shape named, size half the time) or two (colour and
    shape each, different shapes); one attribute of one object swapped for another value of the world's
    (never to the other object's value, so the two stay distinguishable and the blend words name one)."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        count = int(rng.integers(1, 3))
        shapes = rng.choice(world.shapes, size=count, replace=False)
        parts = []
        for s in shapes:
            spec = {"shape": str(s), "color": str(rng.choice(world.colors))}
            if count == 1 and rng.random() < 0.5:
                spec["size"] = str(rng.choice(world.sizes))
            parts.append(ObjectSpec(**spec))
        case = swap_in(parts, world, rng)
        if case is not None:
            cases.append(case)
    return cases


def swap_in(parts: list[ObjectSpec], world: WorldConfig, rng: np.random.Generator) -> SwapCase | None:
    """One attribute the prompt names, of one of its objects, swapped for a value of the world's that none of
    its objects has; None when there is none."""
    part = int(rng.integers(len(parts)))
    kind = str(rng.choice([k for k in KINDS if getattr(parts[part], k) is not None]))
    taken = {getattr(p, kind) for p in parts}
    vocabulary = {"color": world.colors, "shape": world.shapes, "size": world.sizes}[kind]
    values = [v for v in vocabulary if v not in taken]
    return SwapCase(Conjunction(tuple(parts)), part, kind, str(rng.choice(values))) if values else None


def _at(scene: Scene, position: str) -> list[Obj]:
    return [o for o in scene.objects if o.position == position]


def _others(scene: Scene, position: str) -> Counter:
    return Counter(o.key() for o in scene.objects if o.position != position)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of one image (or pixel set) against another, in [-1, 1]: the autoencoder's measure
    (:func:`difflab.models.vae.psnr`), capped at 100 dB where they are equal."""
    return min(100.0, vae_psnr(a[None], b[None]).item())


def psnr_outside(source: torch.Tensor, edited: torch.Tensor, obj: Obj, world: WorldConfig) -> float:
    """PSNR (dB) of two (3, H, W) images in [-1, 1] over the pixels farther than 1.5 of the world's largest
    radius from the object's centre; 100 dB where they are equal."""
    side = source.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    r = 1.5 * max(world.radius.values())  # the largest size's: an edit may grow the object
    far = ((xs + 0.5) / side - obj.x) ** 2 + ((ys + 0.5) / side - obj.y) ** 2 > r**2  # (H, W)
    return psnr(source[:, far], edited[:, far])  # (3, pixels far away) each


def judge(case: SwapCase, source: Scene, edited: Scene, images=None, world: WorldConfig | None = None) -> dict | None:
    """``{"changed", "kept", "exact"}`` of one edited scene (and ``psnr_outside`` given the two ``images``
    and the ``world``), or None when the case cannot be judged (the source does not hold its prompt, or
    more than one object matches the edited phrase)."""
    if not case.source.holds(source):
        return None
    candidates = [o for o in source.objects if matches(case.source.parts[case.part], o)]
    if len(candidates) != 1:
        return None
    obj = candidates[0]
    here = _at(edited, obj.position)
    changed = any(getattr(o, case.attribute) == case.new for o in here)
    same = [a for a in ("shape", "color", "size") if a != case.attribute]
    kept = (len(here) == 1 and all(getattr(here[0], a) == getattr(obj, a) for a in same)
            and _others(edited, obj.position) == _others(source, obj.position))  # fmt: skip
    verdict = {"changed": changed, "kept": kept, "exact": changed and kept}
    if images is not None:
        verdict["psnr_outside"] = psnr_outside(*images, obj, world)
    return verdict


def summarise(cases: list[SwapCase], verdicts: list[dict | None]) -> dict:
    """Rates over the judged cases, overall and per kind of swap, with their n."""

    def rates(pairs) -> dict:
        judged = [v for _, v in pairs if v is not None]
        out = {"n": len(pairs), "judged": len(judged)}
        for key in ("changed", "kept", "exact", "psnr_outside"):
            values = [v[key] for v in judged if key in v]
            out[key] = sum(values) / len(values) if values else None
        return out

    pairs = list(zip(cases, verdicts, strict=True))
    return {"all": rates(pairs)} | {k: rates([p for p in pairs if p[0].attribute == k]) for k in KINDS}


def evaluate(system, cfg, world: WorldConfig, n: int, *, seed: int = 0, case_seed: int = EVAL_SEED,
             batch_size: int = 50, progress: bool = False, blend: bool = False, tau: float = 0.8,
             tau_self: float = 0.4, pooled: bool = True, **sampling) -> dict:  # fmt: skip
    """Prompt-to-Prompt and the naive baseline on ``n`` word-swap cases (``difflab p2p RUN --eval``); ``blend``:
    LocalBlend on the swapped words (off by default: on the demo's run it cut grown objects, docs/editing.md)."""
    if n < 1:
        raise DifflabError(f"n {n} is invalid; expected at least one case")
    cases = swap_cases(world, n, case_seed)
    verdicts = {"p2p": [], "naive": []}
    holds = []
    starts = range(0, n, batch_size)
    for k, start in enumerate(tqdm(starts, desc="editing", disable=not progress, leave=False)):
        batch = cases[start : start + batch_size]
        edits = [c.edit(tau=tau, tau_self=tau_self, blend=blend, pooled=pooled) for c in batch]
        src, edited = prompt_to_prompt(system, cfg, edits, seed=seed + k, **sampling)
        _, regenerated = prompt_to_prompt(system, cfg, [naive(e) for e in edits], seed=seed + k, replan=True,
                                          **sampling)  # fmt: skip
        for case, s, e, r in zip(batch, src.cpu(), edited.cpu(), regenerated.cpu(), strict=True):
            source = read(s, world)
            holds.append(case.source.holds(source))
            verdicts["p2p"].append(judge(case, source, read(e, world), (s, e), world))
            verdicts["naive"].append(judge(case, source, read(r, world), (s, r), world))
    return {
        "n": n,
        "source_holds": sum(holds) / n,
        "settings": {"tau": tau, "tau_self": tau_self, "blend": blend, "pooled": pooled, "seed": seed,
                     "case_seed": case_seed},
        "p2p": summarise(cases, verdicts["p2p"]),
        "naive": summarise(cases, verdicts["naive"]),
    }


def examples(system, cfg, world: WorldConfig, n: int, *, seed: int = 0, case_seed: int = EVAL_SEED,
             sampling: dict | None = None, **settings) -> tuple[torch.Tensor, list[str], list[bool]]:  # fmt: skip
    """The first ``n`` evaluation cases (drawn as the evaluation's first batch) as a picture's tiles: per case
    the source, Prompt-to-Prompt's edit and the naive regeneration (3n, C, H, W), their captions, and the
    reader's verdict on each (the source: does it hold its prompt; an edit: is it exact)."""
    cases = swap_cases(world, n, case_seed)
    edits = [c.edit(**settings) for c in cases]
    src, edited = prompt_to_prompt(system, cfg, edits, seed=seed, **(sampling or {}))
    _, regenerated = prompt_to_prompt(system, cfg, [naive(e) for e in edits], seed=seed, replan=True,
                                      **(sampling or {}))  # fmt: skip
    tiles, captions, marks = [], [], []
    for case, s, e, r in zip(cases, src.cpu(), edited.cpu(), regenerated.cpu(), strict=True):
        source = read(s, world)
        verdicts = [judge(case, source, read(x, world)) for x in (e, r)]
        tiles += [s, e, r]
        captions += [case.source.text(), f"P2P: {case.target.text()}", f"naive: {case.target.text()}"]
        marks += [case.source.holds(source), *(bool(v and v["exact"]) for v in verdicts)]
    return torch.stack(tiles), captions, marks
