"""A caption -> layout planner: the first half of layout-grounded generation (LMD, Lian et al. 2023).

LLM-grounded Diffusion splits text-to-image in two: a language model reads the prompt and writes a
layout (one box and phrase per object), and a grounded diffusion model paints it (GLIGEN, Li et al. 2023:
:mod:`difflab.nn.gligen`, :mod:`difflab.models.t2i`). Counting, binding and position are decided in the
layout, where they are symbols, instead of being discovered by the denoising loss. Here the language
model is a small transformer trained on the toy world's (caption, scene) pairs:

    caption words --------------------------------------------> [w_1 ... w_L]          (bidirectional)
    layout tokens  <start> shape_1 colour_1 size_1 cell_1 shape_2 ... <end>           (causal, reads all w)

one *slot* of four tokens per object, **in the order the caption names the objects** (then the unnamed
ones in reading order; :func:`difflab.world.grounding.caption_order`). That order is the point: a slot
written in the order of the words has its words at a fixed place in the prompt, while in image order it
must first find out which words it belongs to, and the same model then learns binding and position to
about half the accuracy (measured: docs/t2i.md).

Sampling is autoregressive and *constrained* (each position only admits its field's tokens; ``<end>``
only between slots and only once the world's minimum of objects is reached; a cell only when it is free
and the object's size fits there), so every planned layout is a valid scene. Attributes the prompt leaves
open ('a circle': which colour, where?) are drawn from the learned distribution, as a scene would be.
:func:`layout_scene` turns slots into a scene with continuous positions inside the planned cells, placed
without overlap: the boxes the painter is grounded on.

Evaluation checks the prompt on the planned layout itself (the planner alone, no pixels):
``difflab eval PLANNER_RUN``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from difflab.config import to_dict
from difflab.data.text_scenes import TextDataConfig, captioned_scenes
from difflab.errors import MAX_SIZE, DifflabError, check_choice, check_float, check_int
from difflab.models.family import Family, Preset
from difflab.models.runs import checkpoint_id, claim_run_dir, load_latest_weights, load_run_config
from difflab.nn.transformer import Transformer
from difflab.text.word import WordTokenizer
from difflab.train.config import TrainConfig
from difflab.train.trainer import Trainer, make_loader
from difflab.world.geneval import (
    MAX_PER_CATEGORY,
    category,
    check_faithfulness,
    eval_prompts,
    mentions_heldout,
)
from difflab.world.grounding import caption_order
from difflab.world.prompts import Prompt
from difflab.world.scene import (
    Obj,
    Scene,
    WorldConfig,
    fits,
    placeable,
    sample_depths,
    sample_object_in_cell,
    world_preset,
)

FIELDS = ("shape", "color", "size", "cell")
TEMPERATURE_RANGE = (1e-3, 100.0)
"""Sampling temperatures a planner takes: above 0, where the softmax of logits / T is defined."""
"""The four tokens of an object slot, in the order they are written."""


class LayoutVocab:
    """Layout tokens of a world: ``<start>`` 0, ``<end>`` 1, then its shapes, colours, sizes and the nine
    grid cells (row-major). ``field_ids[f]`` are the ids of field f."""

    START, END = 0, 1

    def __init__(self, world: WorldConfig):
        self.world = world
        values = {"shape": world.shapes, "color": world.colors, "size": world.sizes, "cell": range(9)}
        self.tokens: list[tuple[str, object]] = [("<start>", None), ("<end>", None)]
        self.field_ids: dict[str, list[int]] = {}
        for name in FIELDS:
            self.field_ids[name] = list(range(len(self.tokens), len(self.tokens) + len(values[name])))
            self.tokens += [(name, v) for v in values[name]]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.length = 4 * world.max_objects + 1
        """Layout tokens after ``<start>``: every slot, then ``<end>`` (always written, also when full)."""
        self.field_mask = torch.zeros(self.length, len(self.tokens), dtype=torch.bool)
        """(length, vocab): the tokens layout position t may hold (a slot's first may also be <end>)."""
        for t in range(self.length):
            self.field_mask[t, self.field_ids[FIELDS[t % 4]] if t < self.length - 1 else []] = True
            self.field_mask[t, self.END] = t % 4 == 0

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, objects: list[Obj]) -> list[int]:
        """Slots of ``objects`` in the given order, then ``<end>``."""
        ids = []
        for o in objects:
            row, col = o.cell
            ids += [self.index["shape", o.shape], self.index["color", o.color], self.index["size", o.size],
                    self.index["cell", 3 * row + col]]  # fmt: skip
        return ids + [self.END]

    def slots(self, ids: list[int]) -> list[dict]:
        """The object slots of a token sequence (up to ``<end>``): ``{"shape", "color", "size", "cell"}``."""
        out: list[dict] = []
        for k, i in enumerate(ids):
            if i == self.END:
                break
            name, value = self.tokens[i]
            if name != FIELDS[k % 4]:
                raise DifflabError(f"layout token {k} is a {name}; expected a {FIELDS[k % 4]}")
            if k % 4 == 0:
                out.append({})
            out[-1][name] = value
        return out


@dataclass(frozen=True)
class PlannerConfig:
    kind: str = "planner"
    data: TextDataConfig = field(default_factory=lambda: TextDataConfig(n=400_000, short_prob=0.4))
    """Scenes and captions; each item is a fresh scene, so no caption is seen twice (n > steps * batch)."""
    context_length: int = 24
    """Caption tokens, <bos> and <eos> included (a two-object description has 19)."""
    width: int = 64
    depth: int = 3
    heads: int = 4
    slot_fields: str = "parallel"
    """'sequential': a slot's fields are written one after another, each seeing the ones before; 'parallel':
    all four are drawn at once from the state before the slot, independent given the caption and the
    earlier slots (the cell still after the size it must fit). Parallel cannot learn 'circles are never
    orange' from the slot itself, which is what a held-out (colour, shape) prompt needs (docs/t2i.md)."""
    temperature: float = 0.5
    """Sampling temperature of every field's draw (the logits divided by it before the softmax), as a
    language model is sampled. Below 1 the planner keeps to what it is surest of: at 1 a planned layout
    breaks a position prompt about one time in ten (docs/t2i.md), at 0.5 almost never, at the price of
    fewer different layouts for one prompt (the report's ``diversity``). Used when sampling, not training."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads"):
            check_int(name, getattr(self, name), 1, MAX_SIZE)
        check_int("context_length", self.context_length, 3, MAX_SIZE)  # <bos>, a token, <eos>
        check_float("temperature", self.temperature, *TEMPERATURE_RANGE)
        check_choice("slot_fields", self.slot_fields, ("sequential", "parallel"))
        if self.width % self.heads:
            raise DifflabError(f"width {self.width} is invalid; expected a multiple of heads ({self.heads})")


def resolve(cfg: PlannerConfig, *, attach: bool = True) -> PlannerConfig:
    return cfg


def make_tokenizer(cfg: PlannerConfig) -> WordTokenizer:
    return WordTokenizer.for_world(context_length=cfg.context_length)


class LayoutPlanner(nn.Module):
    """``forward(ids, mask, layout) -> logits (B, T, vocab)``: caption ids and mask (B, L), layout tokens
    (B, T) starting with ``<start>``; logit t predicts layout token t + 1."""

    def __init__(self, cfg: PlannerConfig, tokenizer: WordTokenizer):
        super().__init__()
        world = world_preset(cfg.data.world)
        self.cfg, self.vocab = cfg, LayoutVocab(world)
        self.length = cfg.context_length
        self.word_embed = nn.Embedding(tokenizer.vocab_size, cfg.width)
        self.layout_embed = nn.Embedding(len(self.vocab), cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.context_length + self.vocab.length, cfg.width) * 0.02)
        self.blocks = Transformer(cfg.width, cfg.depth, cfg.heads)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, len(self.vocab))

    def attention_mask(self, mask: torch.Tensor, t: int) -> torch.Tensor:
        """(B, L) caption mask -> (B, L + T, L + T): every token sees the real caption words; a layout
        token also sees the layout tokens up to itself (a prefix language model)."""
        b, length = mask.shape
        n = length + t
        keys = torch.cat([mask, torch.zeros(b, t, dtype=torch.bool, device=mask.device)], 1)  # (B, N)
        allowed = keys[:, None, :].expand(b, n, n).clone()  # (B, query, key)
        allowed[:, length:, length:] = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        return allowed | torch.eye(n, dtype=torch.bool, device=mask.device)[None]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        t = layout.shape[1]
        x = torch.cat([self.word_embed(ids), self.layout_embed(layout)], 1)  # (B, L + T, width)
        x = self.blocks(x + self.pos[:, : x.shape[1]], self.attention_mask(mask, t))
        return self.head(self.norm(x[:, self.length :]))  # (B, T, vocab)

    def field_logits(self, ids: torch.Tensor, mask: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab): the logits of layout token t + 1 given the caption and ``layout`` (B, T), each
        row masked to its field's tokens (a shape or <end>, a colour, a size, a cell). Sequentially from
        position t; in parallel from the state before the slot (position 4 * (t // 4))."""
        logits = self.forward(ids, mask, layout)
        t = layout.shape[1]
        if self.cfg.slot_fields == "parallel":
            logits = logits[:, (torch.arange(t, device=logits.device) // 4) * 4]
        return logits.masked_fill(~self.vocab.field_mask[:t].to(logits.device), float("-inf"))

    @torch.no_grad()
    def sample(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> list[list[dict]]:
        """One layout (a list of slots) per caption, drawn under the constraints of the module docstring:
        token by token, or (``slot_fields='parallel'``) slot by slot, at the config's ``temperature``. The
        draws come from ``generator`` (CPU), so a seed gives the same layouts on any device."""
        vocab = self.vocab
        b, dev = ids.shape[0], ids.device
        layout = torch.full((b, 1), vocab.START, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool)
        parallel = self.cfg.slot_fields == "parallel"
        for k in range(vocab.length):
            slot, f = divmod(k, 4)
            if not parallel or f == 0:
                logits = self.forward(ids, mask, layout)[:, -1].float().cpu()  # (B, vocab)
            allowed = torch.stack(
                [self._allowed(layout[i, 1:].tolist(), slot, FIELDS[f], done[i]) for i in range(b)]
            )
            probs = (logits / self.cfg.temperature).masked_fill(~allowed, float("-inf")).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            done |= nxt[:, 0] == vocab.END
            layout = torch.cat([layout, nxt.to(dev)], 1)
        return [vocab.slots(row[1:].tolist()) for row in layout.cpu()]

    def _allowed(self, so_far: list[int], slot: int, name: str, done: bool) -> torch.Tensor:
        world, vocab = self.vocab.world, self.vocab
        allowed = torch.zeros(len(vocab), dtype=torch.bool)
        if done or (name == "shape" and slot == world.max_objects):
            allowed[vocab.END] = True  # finished: <end> pads the rest
            return allowed
        if name == "shape" and slot >= world.min_objects:
            allowed[vocab.END] = True
        ids = vocab.field_ids[name]
        if name != "cell":
            allowed[ids] = True
            return allowed
        taken = {vocab.tokens[i][1] for i in so_far[3::4]}
        size = vocab.tokens[so_far[-1]][1]
        for cell, i in enumerate(ids):
            allowed[i] = cell not in taken and placeable(world, size, *divmod(cell, 3))
        return allowed


def layout_scene(slots: list[dict], world: WorldConfig, rng: np.random.Generator, tries: int = 100) -> Scene:
    """A scene of the planned slots: each object at a random position inside its cell, without overlap
    (``tries`` draws of all positions; the last is kept if none fits, which the reader will see)."""
    objects: list[Obj] = []
    for _ in range(tries):
        objects = []
        for s in slots:
            row, col = divmod(int(s["cell"]), 3)
            objects.append(sample_object_in_cell(rng, world, s["shape"], s["color"], s["size"], row, col))
        if all(fits(o, objects[:i], world) for i, o in enumerate(objects)):
            break
    depths = sample_depths(rng, len(objects))
    objects = [dataclasses.replace(o, depth=float(d)) for o, d in zip(objects, depths, strict=True)]
    return Scene(tuple(objects), background=world.background)


def plan(
    planner: LayoutPlanner, tokenizer, prompts: list[str], seed: int = 0, batch_size: int = 256
) -> list[Scene]:
    """One planned scene (objects at positions inside their planned cells) per prompt, at the planner
    config's temperature; ``seed`` fixes both the slots and the positions."""
    device = next(planner.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = tokenizer.encode(list(prompts[start : start + batch_size]))
        for slots in planner.sample(ids.to(device), mask.to(device), gen):
            out.append(layout_scene(slots, planner.vocab.world, rng))
    return out


# ------------------------------------------------------------------------------------------- training


class LayoutExamples(torch.utils.data.Dataset):
    """Item i: the caption of captioned scene i (tokenized) and the scene's layout tokens in caption
    order (``"layout"``, padded with ``<end>``; ``"target_mask"`` marks the tokens up to the first
    ``<end>``, the only ones learned). No pixels are drawn."""

    def __init__(self, cfg: PlannerConfig, tokenizer):
        self.scenes = captioned_scenes(cfg.data)
        self.tokenizer, self.vocab = tokenizer, LayoutVocab(world_preset(cfg.data.world))

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        scene = self.scenes.scene(i)
        text, prompt, _ = self.scenes.caption(i, scene)
        ids, mask = self.tokenizer.encode(text)
        tokens = self.vocab.encode([scene.objects[j] for j in caption_order(prompt, scene)])
        n = len(tokens)
        tokens += [LayoutVocab.END] * (self.vocab.length - n)
        target_mask = torch.arange(self.vocab.length) < n
        return {"ids": ids[0], "mask": mask[0], "layout": torch.tensor(tokens), "target_mask": target_mask}


def loss_fn(model: LayoutPlanner, batch: dict, generator: torch.Generator):
    """Cross-entropy of every layout token given the caption and the tokens before it (teacher forcing),
    over its field's tokens."""
    layout = batch["layout"]  # (B, T)
    start = torch.full_like(layout[:, :1], LayoutVocab.START)
    logits = model.field_logits(
        batch["ids"], batch["mask"], torch.cat([start, layout[:, :-1]], 1)
    )  # (B, T, V)
    keep = batch[
        "target_mask"
    ].flatten()  # (B*T,): up to the first <end>; the padding after it is not learned
    return F.cross_entropy(logits.flatten(0, 1)[keep], layout.flatten()[keep]), {}


def attach_planner(cfg, planner_dir: str | Path):
    """``cfg``, a run record with ``planner``, ``planner_checkpoint`` and ``data.world`` (a layout recipe, a
    ControlNet on layouts), with the planner run at ``planner_dir`` resolved and its checkpoint recorded; an
    error when that planner plans another world."""
    path = Path(planner_dir).expanduser().resolve()
    world = load_config(path).data.world
    if world != cfg.data.world:
        raise DifflabError(f"planner '{path}' plans '{world}' scenes; expected the '{cfg.data.world}' world "
                           "this model draws")  # fmt: skip
    return dataclasses.replace(
        cfg, planner=str(path), planner_checkpoint=checkpoint_id(path, "layout planner run")
    )


def check_unchanged(cfg, what: str) -> None:
    """An error when the planner a run record names (if any) is no longer the checkpoint it recorded."""
    if cfg.planner is not None and checkpoint_id(cfg.planner, "layout planner run") != cfg.planner_checkpoint:
        raise DifflabError(f"layout planner '{cfg.planner}' has changed since {what}")


def load_config(run_dir: str | Path) -> PlannerConfig:
    return load_run_config(run_dir, PlannerConfig, "planner", "a layout planner run")


def train(cfg: PlannerConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train the planner into ``run_dir`` (config.json, checkpoints/, metrics.jsonl)."""
    cfg = resolve(cfg)
    with claim_run_dir(run_dir, cfg, resume, load_config) as run_dir:
        tokenizer = make_tokenizer(cfg)
        torch.manual_seed(cfg.train.seed)  # the initial weights
        model = LayoutPlanner(cfg, tokenizer)
        loader = make_loader(LayoutExamples(cfg, tokenizer), cfg.train)
        model_config = {
            k: to_dict(cfg)[k] for k in ("context_length", "width", "depth", "heads", "slot_fields")
        }
        Trainer(model, loss_fn, loader, cfg.train, run_dir, model_config=model_config).fit(resume=resume)
    return run_dir


def load_model(
    run_dir: str | Path, *, ema: bool = True, device: str = "cpu", temperature: float | None = None
) -> tuple[LayoutPlanner, PlannerConfig]:
    """The trained planner (EMA weights by default) and its config; ``temperature`` replaces the config's
    sampling temperature."""
    cfg = load_config(run_dir)
    if temperature is not None:
        cfg = dataclasses.replace(cfg, temperature=temperature)  # checked by the config
    model = LayoutPlanner(cfg, make_tokenizer(cfg))
    return load_latest_weights(run_dir, model, ema=ema).to(device).eval(), cfg


def info_network(cfg: PlannerConfig):
    """The planner with an example batch of captions and layouts (``difflab info``)."""
    b, vocab = cfg.train.batch_size, LayoutVocab(world_preset(cfg.data.world))
    tokenizer = make_tokenizer(cfg)
    inputs = {"ids": torch.randint(0, tokenizer.vocab_size, (b, cfg.context_length)),
              "mask": torch.ones(b, cfg.context_length, dtype=torch.bool),
              "layout": torch.randint(0, len(vocab), (b, vocab.length))}  # fmt: skip
    return LayoutPlanner(cfg, tokenizer), inputs, None


def evaluate(run_dir: str | Path, n: int = MAX_PER_CATEGORY, *, seed: int = 0, progress: bool = False,
             prompt_seed: int | None = None, temperature: float | None = None) -> dict:  # fmt: skip
    """Does the prompt hold on the planned layout? The first ``n`` prompts of every GenEval category, one
    layout each, checked by the prompt's own ``holds`` (no pixels: the planner alone). ``diversity``: what
    a lower temperature costs, the mean number of different layouts among :data:`DIVERSITY_DRAWS` draws
    of one prompt, over the first 20 prompts of each category."""
    model, cfg = load_model(run_dir, temperature=temperature)
    prompts = eval_prompts(cfg.data.world, n, prompt_seed)
    scenes = []
    for start in tqdm(range(0, len(prompts), 100), desc="planning", disable=not progress, leave=False):
        batch = [p.text() for p in prompts[start : start + 100]]
        scenes += plan(model, make_tokenizer(cfg), batch, seed=seed + start)
    report = {"all": check_faithfulness(prompts, scenes)}
    pairs = cfg.data.pairs()
    heldout = [i for i, p in enumerate(prompts) if mentions_heldout(p, pairs)]
    if heldout:
        report["heldout_pairs"] = check_faithfulness(
            [prompts[i] for i in heldout], [scenes[i] for i in heldout]
        )
    prompt_set = "shipped" if prompt_seed is None else f"drawn with seed {prompt_seed}"
    few = eval_prompts(cfg.data.world, min(n, 20), prompt_seed)  # 20 per category, 8 draws each
    return {"run": str(run_dir), "prompts_per_category": n, "prompt_set": prompt_set, "temperature": cfg.temperature,
            "judge": "the prompt's holds() on the planned layout", "faithfulness": report,
            "diversity": diversity(model, cfg, few, seed)}  # fmt: skip


DIVERSITY_DRAWS = 8
"""Draws per prompt behind the ``diversity`` of a planner's report."""


def diversity(model: LayoutPlanner, cfg: PlannerConfig, prompts: list[Prompt], seed: int = 0) -> dict:
    """Per category and overall: the mean number of different layouts (slots: shape, colour, size,
    cell) among :data:`DIVERSITY_DRAWS` draws of each prompt (at most that many; 1 is a planner that
    always draws the same layout)."""
    texts = [p.text() for p in prompts]
    ids, mask = make_tokenizer(cfg).encode(texts * DIVERSITY_DRAWS)  # draw k of prompt i: row k * P + i
    device = next(model.parameters()).device
    slots = model.sample(ids.to(device), mask.to(device), torch.Generator().manual_seed(seed + 1))
    layouts = [str(s) for s in slots]
    distinct = [len(set(layouts[i :: len(texts)])) for i in range(len(texts))]
    out: dict[str, float] = {}
    for name in dict.fromkeys(category(p) for p in prompts):
        mine = [d for d, p in zip(distinct, prompts, strict=True) if category(p) == name]
        out[name] = sum(mine) / len(mine)
    return out | {"overall": sum(distinct) / len(distinct), "draws": DIVERSITY_DRAWS}


PRESETS = (
    Preset(
        "planner_tiny",
        "planner",
        "caption -> layout planner on scene32, a few hundred steps: seconds (tests)",
        lambda: PlannerConfig(
            data=TextDataConfig(n=20_000, short_prob=0.4), width=32, depth=1, heads=2,
            train=TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, ema_decay=None, log_every=10,
                              checkpoint_every=None, progress=False),
        ),
    ),
    Preset(
        "planner_demo",
        "planner",
        "caption -> layout planner on scene32 (LMD's first stage): about two minutes on a CPU",
        lambda: PlannerConfig(
            train=TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup_steps=50, ema_decay=0.99, log_every=50,
                              checkpoint_every=500),
        ),
    ),
)  # fmt: skip

FAMILY = Family(
    name="planner",
    what="a layout planner run",
    config=PlannerConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="",
    eval_n=MAX_PER_CATEGORY,
    eval_options=("progress", "prompt_seed", "temperature"),
)
