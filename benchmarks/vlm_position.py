"""Why a VLM cannot say where a named object is (docs/vlm.md, "Where is the diamond?").

Three readings of one trained run (``difflab train --preset vlm_llava ...``), on held-out scenes:

1. **Who it answers about.** Position questions ('where is the diamond?') split by the scene's object count;
   in two-object scenes, how many wrong answers are the *other* object's position (then the model read a
   position, but of the wrong object).
2. **Where the answer token looks.** For two-object colour and position questions whose named object and the
   other one fall in different visual tokens, the attention probability of the last prompt token ('?', whose
   logits give the answer) on the named object's token minus that on the other object's, per LM block and
   head, averaged (autoregressive fusion with pooled tokens only: token k covers cell k of a square grid).
3. **Whether position is there to read.** A ridge probe from each visual token (the connector's output, as the
   LM's first block receives it after adding ``wpe``) to its index: accuracy on held-out tokens.
4. **Where the named object's word looks.** For two-object colour and position questions, the share of the
   phrase end's attention over the visual tokens ('diamond' in 'where is the diamond ?', averaged over heads)
   that falls on the tokens the named object covers, per LM block: what ``--set grounding=1`` trains
   (:mod:`difflab.models.vlm_grounding`); attention spread evenly gives the object's share of the grid.
5. **Whose shape a caption names.** Held-out captions parsed and aligned to the scene's objects (as the judge
   does): of the objects named with a wrong shape, how many got the shape of another object in the scene (a
   binding error) and how many a shape the scene does not show.

    python benchmarks/vlm_position.py runs/llava --n 1500
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F

from difflab.data.vqa import caption_cases, vqa_cases
from difflab.models import vlm
from difflab.models import vlm_grounding as grounding
from difflab.models.attention_supervision import object_masks
from difflab.models.vlm_eval import align
from difflab.world.language import spec_of
from difflab.world.parse import parse_caption, parse_question


def _position(obj) -> str:
    return spec_of(obj, ["position"]).position


def _named(question: str, scene) -> list:
    """The objects the question's description fits (shape, colour, size; position questions name no place)."""
    spec = parse_question(question).spec
    fits = lambda o: all(getattr(spec, a) in (None, getattr(o, a)) for a in ("shape", "color", "size"))  # noqa: E731
    return [o for o in scene.objects if fits(o)]


def who_it_answers_about(model, cfg, cases) -> dict:
    cases = [c for c in cases if c.kind == "position"]
    with torch.no_grad():
        answers = vlm.answer(model, cfg, torch.stack([c.image for c in cases]), [c.question for c in cases])
    tally = Counter()
    for c, a in zip(cases, answers, strict=True):
        n = len(c.scene.objects)
        tally[(n, "right" if a == c.answer else "wrong")] += 1
        if a != c.answer and a in {_position(o) for o in c.scene.objects}:
            tally[(n, "another object's")] += 1
    return tally


def where_the_answer_looks(model, cfg, cases, limit: int = 200) -> dict:
    """(kind, block) -> per-head mean of p(named token) - p(other token) at the last prompt token."""
    k = cfg.visual_tokens
    side = math.isqrt(k)
    if cfg.fusion != "autoregressive" or side * side != k or cfg.connector not in ("linear", "mlp"):
        return {}
    tokenizer = vlm.make_tokenizer(cfg)
    probs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.lm.blocks):
        block.attn.probs_hook = lambda p, i=i: probs.__setitem__(i, p.detach())

    def cell(o) -> int:
        return min(int(o.y * side), side - 1) * side + min(int(o.x * side), side - 1)

    out = defaultdict(list)
    with torch.no_grad():
        for kind in ("color", "position"):
            mine = [c for c in cases if c.kind == kind and len(c.scene.objects) == 2][:limit]
            for c in mine:
                named = _named(c.question, c.scene)
                if len(named) != 1:
                    continue
                other = next(o for o in c.scene.objects if o is not named[0])
                if cell(named[0]) == cell(other):
                    continue
                ids, mask = tokenizer.encode([c.question])
                n = int(mask[0].sum()) - 1  # <bos> question, without <eos>
                model(c.image[None], ids[:, :n], mask[:, :n])
                for i, p in probs.items():
                    row = p[0, :, k + n - 1, :k]  # (heads, K): the last prompt token on the visual tokens
                    out[(kind, i)].append((row[:, cell(named[0])] - row[:, cell(other)]).tolist())
    for block in model.lm.blocks:
        block.attn.probs_hook = None
    return {key: torch.tensor(v).mean(0).tolist() for key, v in out.items()}


def where_the_noun_looks(model, cfg, cases, limit: int = 200) -> dict:
    """(kind, block) -> mean share of the phrase end's visual attention on the named object's tokens, and
    (kind, 'even') -> the mean share of the grid those tokens are (the share of attention spread evenly)."""
    k = cfg.visual_tokens
    side = math.isqrt(k)
    if cfg.fusion != "autoregressive" or side * side != k or cfg.connector not in ("linear", "mlp"):
        return {}
    world = cfg.data.world_config()
    tokenizer = vlm.make_tokenizer(cfg)
    recorder = grounding.LMAttentionProbs(model.lm, list(range(len(model.lm.blocks))))
    out = defaultdict(list)
    with torch.no_grad():
        for kind in ("color", "position"):
            for c in [c for c in cases if c.kind == kind and len(c.scene.objects) == 2][:limit]:
                target = grounding.question_mask(c.question, object_masks(c.scene, world, side), c.scene)
                covered = target.flatten() > 0  # (K,)
                ids, mask = tokenizer.encode([c.question])
                n = int(mask[0].sum()) - 1  # <bos> question, without <eos>
                with recorder.recording():
                    model(c.image[None], ids[:, :n], mask[:, :n])
                for block, probs in zip(recorder.blocks, recorder.records, strict=True):
                    row = probs[0, k + n - 2, :k]  # the phrase end (before '?') on the visual tokens
                    out[(kind, block)].append(float(row[covered].sum() / row.sum()))
                out[(kind, "even")].append(float(covered.float().mean()))
    return {key: sum(v) / len(v) for key, v in out.items()}


def whose_shape_captions_name(model, cfg, n: int, seed: int) -> Counter:
    """(object count, 'named' | 'another object's shape' | 'a shape not in the scene') -> objects."""
    world = cfg.data.world_config()
    cases = caption_cases(world, n, seed, heldout=cfg.data.pairs())
    with torch.no_grad():
        captions = vlm.caption(model, cfg, torch.stack([c.image for c in cases]))
    tally = Counter()
    for case, text in zip(cases, captions, strict=True):
        parsed = parse_caption(text, world)
        objects = case.scene.objects
        instances = parsed.instances if parsed is not None else ()
        for spec, j in zip(instances, align(instances, objects), strict=True):
            if j is None or spec.shape is None:
                continue
            tally[(len(objects), "named")] += 1
            if spec.shape != objects[j].shape:
                other = any(o.shape == spec.shape for o in objects)
                tally[(len(objects), "another object's shape" if other else "a shape not in the scene")] += 1
    return tally


def position_probe(model, cfg, cases) -> float:
    """Held-out accuracy of a ridge probe from a visual token (plus the LM's wpe) to its index."""
    images = torch.stack([c.image for c in cases])
    k = cfg.visual_tokens
    with torch.no_grad():
        x = model.visual(images) + (model.lm.wpe.weight[:k] if cfg.fusion == "autoregressive" else 0)
    b = x.shape[0]
    features = torch.cat([x.reshape(b * k, -1), torch.ones(b * k, 1)], dim=1)  # (B*K, D+1)
    target = torch.arange(k).repeat(b)
    onehot = F.one_hot(target, k).float()
    cut = (b * 4 // 5) * k  # train on the first 80 % of images
    a, y = features[:cut], onehot[:cut]
    w = torch.linalg.solve(a.T @ a + 0.1 * torch.eye(a.shape[1]), a.T @ y)
    return float(((features[cut:] @ w).argmax(1) == target[cut:]).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a vlm run")
    p.add_argument("--n", type=int, default=1500, help="held-out VQA cases drawn (a fifth are position questions)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, cfg = vlm.load_model(args.run)
    cases = vqa_cases(cfg.data.world_config(), args.n, args.seed, heldout=cfg.data.pairs())
    tally = who_it_answers_about(model, cfg, cases)
    print("position questions by object count:")
    for n in sorted({n for n, _ in tally}):
        right, wrong, other = tally[(n, "right")], tally[(n, "wrong")], tally[(n, "another object's")]
        print(f"  {n} object(s): {right}/{right + wrong} right; of {wrong} wrong answers, {other} are another "
              "object's position")  # fmt: skip
    looks = where_the_answer_looks(model, cfg, cases)
    if looks:
        print("attention of the answer token, p(named object's token) - p(other's), per head:")
        for (kind, block), heads in sorted(looks.items()):
            print(f"  {kind:8s} block {block}: " + " ".join(f"{h:+.3f}" for h in heads))
    print(f"ridge probe, visual token -> its index: {position_probe(model, cfg, cases[:500]):.3f}")
    shares = where_the_noun_looks(model, cfg, cases)
    if shares:
        print("share of the named object's word's visual attention on the object's tokens, per block:")
        for kind in ("color", "position"):
            blocks = " ".join(f"{shares[(kind, b)]:.2f}" for b in range(len(model.lm.blocks)))
            print(f"  {kind:8s} {blocks} (spread evenly: {shares[(kind, 'even')]:.2f})")
    tally = whose_shape_captions_name(model, cfg, args.n // 3, args.seed)
    print("captions: objects named with a shape, and the wrong shapes among them:")
    for n in sorted({n for n, _ in tally}):
        other, absent = tally[(n, "another object's shape")], tally[(n, "a shape not in the scene")]
        print(f"  {n} object(s): {tally[(n, 'named')]} named; wrong: {other} another object's shape, {absent} a "
              "shape not in the scene")


if __name__ == "__main__":
    main()
