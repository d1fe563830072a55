"""What a frozen CLIP's patch tokens hold for a VLM (docs/vlm.md, "Grounding: the place of the named object").

Two readings of a CLIP run's ViT (``difflab train --preset clip_demo``) on held-out two-object scenes, its
patch tokens pooled 2x2 to the 16 tokens a LLaVA of the presets reads:

1. **Is shape local?** Per ViT block, a ridge probe from the token under object A's centre to A's shape, and
   from the same token to the *other* object's shape. A token that names the other object's shape as well as
   its own carries the scene, not its patch: an LM cannot find an object by matching its shape there.
2. **Can one attention head find the named object's place?** A readout trained on the frozen tokens alone:
   a learned query per shape attends over the 16 tokens (each through a small MLP, plus a learned position
   vector) and a classifier reads the answer ('top left', ...) from what it gathered. Held-out accuracy on
   one- and two-object scenes as it trains: the features hold the answer when this finds it.

    python benchmarks/vlm_features.py runs/clip
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from difflab.data.vqa import vqa_cases
from difflab.models import clip
from difflab.models.runs import load_latest_weights
from difflab.models.vlm_network import patch_features
from difflab.world.parse import parse_question


def pooled_tokens(vit, images: torch.Tensor, layer: int, side: int = 4) -> torch.Tensor:
    """(B, 3, S, S) -> (B, side * side, D): block ``layer``'s patch tokens average-pooled to a side x side grid,
    as the presets' TokenPool does."""
    with torch.no_grad():
        z = torch.cat([patch_features(vit, images[i : i + 256], layer) for i in range(0, len(images), 256)])
    b, n, d = z.shape
    grid = int(n**0.5)
    z = z.transpose(1, 2).reshape(b, d, grid, grid)  # (B, D, g, g)
    return F.avg_pool2d(z, grid // side).flatten(2).transpose(1, 2)  # (B, side * side, D)


def _ridge_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    cut = len(x) * 4 // 5
    onehot = F.one_hot(y, classes).float()
    w = torch.linalg.solve(x[:cut].T @ x[:cut] + 0.1 * torch.eye(x.shape[1]), x[:cut].T @ onehot[:cut])
    return float(((x[cut:] @ w).argmax(1) == y[cut:]).float().mean())


def shape_locality(vit, cases, shapes: list[str]) -> list[tuple[int, float, float]]:
    """Per block: (block, probe accuracy of A's shape, of the other object's shape) from A's centre token."""
    two = [
        c for c in cases if len(c.scene.objects) == 2 and c.scene.objects[0].shape != c.scene.objects[1].shape
    ]
    images = torch.stack([c.image for c in two])
    own = torch.tensor([shapes.index(c.scene.objects[0].shape) for c in two])
    other = torch.tensor([shapes.index(c.scene.objects[1].shape) for c in two])
    cells = torch.tensor(
        [min(int(o.y * 4), 3) * 4 + min(int(o.x * 4), 3) for o in (c.scene.objects[0] for c in two)]
    )
    out = []
    for layer in range(len(vit.transformer.blocks)):
        tokens = pooled_tokens(vit, images, layer)[torch.arange(len(two)), cells]  # (B, D): A's centre token
        out.append(
            (layer, _ridge_accuracy(tokens, own, len(shapes)), _ridge_accuracy(tokens, other, len(shapes)))
        )
    return out


class AttentionReadout(nn.Module):
    """One attention layer over frozen tokens: query = a learned vector per shape; keys and values = an MLP of
    each token plus a learned position vector; answer = an MLP of what the query gathered."""

    def __init__(
        self, d_in: int, shapes: int, answers: int, tokens: int = 16, width: int = 64, heads: int = 4
    ):
        super().__init__()
        self.tokens = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width))
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, width))
        self.query = nn.Embedding(shapes, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, answers))

    def forward(self, tokens: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        kv = self.tokens(tokens) + self.pos  # (B, K, W)
        gathered, _ = self.attn(self.query(shape)[:, None], kv, kv)  # (B, 1, W)
        return self.head(gathered[:, 0])  # (B, answers)


def readout(vit, cases, shapes: list[str], layer: int, steps: int, batch: int, every: int):
    """Train :class:`AttentionReadout` on position questions; yield (step, examples seen, accuracy on held-out
    one-object questions, on two-object ones)."""
    cases = [c for c in cases if c.kind == "position"]
    answers = sorted({c.answer for c in cases})
    tokens = pooled_tokens(vit, torch.stack([c.image for c in cases]), layer)
    shape = torch.tensor([shapes.index(parse_question(c.question).spec.shape) for c in cases])
    target = torch.tensor([answers.index(c.answer) for c in cases])
    two = torch.tensor([len(c.scene.objects) == 2 for c in cases])
    cut = len(cases) * 4 // 5
    torch.manual_seed(0)
    model = AttentionReadout(tokens.shape[-1], len(shapes), len(answers))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                right = model(tokens[cut:], shape[cut:]).argmax(1) == target[cut:]
            held_two = two[cut:]
            yield (
                step,
                step * batch,
                float(right[~held_two].float().mean()),
                float(right[held_two].float().mean()),
            )
        i = torch.randint(0, cut, (batch,))
        loss = F.cross_entropy(model(tokens[i], shape[i]), target[i])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("clip_run", help="a CLIP run (clip_demo) on the scene32 world")
    p.add_argument(
        "--n", type=int, default=30000, help="held-out VQA cases drawn (a fifth are position questions)"
    )
    p.add_argument(
        "--layer", type=int, default=-2, help="ViT block the readout reads (-2: LLaVA's penultimate)"
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    vit = (
        load_latest_weights(args.clip_run, clip.CLIP(clip.load_config(args.clip_run)), ema=True).eval().visual
    )
    start = time.time()
    cases = vqa_cases("scene32", args.n, 5)
    shapes = sorted({o.shape for c in cases for o in c.scene.objects})
    print(f"{len(cases)} held-out cases drawn in {time.time() - start:.0f} s")
    print("shape probe from the token under object A's centre (two-object scenes), per ViT block:")
    for layer, own, other in shape_locality(vit, cases[: args.n // 4], shapes):
        print(
            f"  block {layer}: A's shape {own:.3f}, the other object's shape {other:.3f} (chance {1 / len(shapes):.3f})"
        )
    print(f"attention readout over block {args.layer}'s tokens, 'where is the <shape>?' (held-out accuracy):")
    for step, seen, one, two in readout(vit, cases, shapes, args.layer, args.steps, args.batch, 100):
        print(f"  step {step:4d} ({seen:6d} questions seen): one-object {one:.3f}, two-object {two:.3f}")


if __name__ == "__main__":
    main()
