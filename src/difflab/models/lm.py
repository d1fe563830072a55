"""The small language model of the vision-language models: GPT-2 (:mod:`difflab.nn.gpt`) trained on
what the toy world says, before any image is shown to it (LLaVA, Liu et al. 2023, starts from a
pretrained LM; so do Flamingo and BLIP-2).

The corpus is the world's own text, drawn fresh for every item from scenes of the configured world:
captions of every style ('a large red circle at the top left', 'two green circles', the full
description) and question/answer lines written ``"<question text> <answer>"``
(:func:`qa_text`: 'how many circles? 2', tokenized ``<bos> how many circles ? 2 <eos>``), the format the
VLM asks and is answered in. Scenes showing a held-out (colour, shape) pair are redrawn, as for every
other model trained on the world.

Rows are *packed*, as GPT-3 packs documents into its full context with no special mask between them
(Brown et al. 2020, Sec. 2.3): whole texts ``<bos> ... <eos>`` back to back until the next would not
fit, the rest padding. A text is about nine tokens; packing makes every position up to
``context_length`` a trained one, which is where a VLM's text sits once its visual tokens come first.
The loss is next-token cross-entropy on real tokens:

    L = - 1/|T| sum_{t in T} log p(x_{t+1} | x_{<=t}),   T = positions whose next token is not padding

A text-only model cannot know the answer to 'how many circles?' (there is no image); what it can learn
is the answer's *form*, which :func:`evaluate` measures, and the answers' prior (the blind baseline a
VLM must beat: VQA's question-only baseline, Antol et al. 2015; Goyal et al. 2017).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from difflab.config import to_dict
from difflab.data.text_scenes import TextDataConfig, captioned_scenes
from difflab.errors import DifflabError, check_float
from difflab.models.family import Family, Preset
from difflab.models.runs import claim_run_dir, load_latest_weights, load_run_config
from difflab.nn.gpt import GPT, GPTConfig
from difflab.text.tokenizer import WordTokenizer, load_tokenizer
from difflab.train.config import TrainConfig
from difflab.train.device import is_main_process
from difflab.train.trainer import Trainer, make_loader
from difflab.world.language import QUESTION_KINDS, questions
from difflab.world.scene import ALL_SHAPES, COLORS, POSITIONS, WorldConfig

LM_WORDS = ("describe", "image", ".")
"""Words the world's vocabulary lacks that the VLM's captioning instruction 'describe the image .' needs."""
LM_TEXT = 31
"""The random stream of an LM item's draws (caption or question, which question); the captions themselves
use text-to-image's stream (:data:`difflab.data.captioned.T2I_CAPTIONS`)."""
EVAL_SEED = 40_009
"""World seed of the held-out texts :func:`evaluate` reads (plus ``--seed``): no training set draws it."""
LONGEST_QA = 16
"""A bound on a question/answer line's tokens, <bos> and <eos> included: a question has at most 12
(:meth:`WordTokenizer.for_world`), an answer at most 2 ('top left')."""


def qa_text(question: str, answer: str) -> str:
    """A question/answer line as the LM learns it and the VLM asks it: ``"<question text> <answer>"``,
    e.g. ``qa_text("how many circles?", "2") == "how many circles? 2"``."""
    return f"{question} {answer}"


@functools.lru_cache(maxsize=8)
def lm_tokenizer(context_length: int) -> WordTokenizer:
    """The toy world's word tokenizer (:meth:`WordTokenizer.for_world`) with :data:`LM_WORDS` added after
    its ids, so that 'describe the image .' is sayable (built once per process)."""
    return WordTokenizer.for_world(context_length=context_length).with_words(LM_WORDS)


def prompt_ids(tokenizer: WordTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> text`` without ``<eos>``, right-padded: (ids, mask), each (B, context_length), what
    :meth:`GPT.generate` continues."""
    ids, mask = tokenizer.encode(texts)
    eos = mask.sum(1) - 1  # (B,): <eos> is each row's last real token
    rows = torch.arange(len(texts))
    mask[rows, eos] = False
    ids[rows, eos] = tokenizer.pad_id
    return ids, mask


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LMDataConfig(TextDataConfig):
    """Text-to-image's captioned scenes (:class:`TextDataConfig`: world, seed, held-out pairs, caption
    mix) with question/answer lines among the captions."""

    n: int = 1_000_000
    """Rows; every text of every row is drawn from a scene of its own, so no text repeats (n > steps * batch)."""
    describe_prob: float = 0.1
    """Of the caption texts: the share that are the scene's full description (random-style captions may
    be descriptions too)."""
    short_prob: float = 0.3
    """Of the caption texts: the share in the short forms people type ('a red circle and a blue square')."""
    qa_prob: float = 0.5
    """Share of texts that are question/answer lines (:func:`qa_text`) instead of captions."""
    pack: bool = True
    """Whole texts back to back in each row (module docstring); False: one text per row, padded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("qa_prob", self.qa_prob, 0.0, 1.0)


@dataclass(frozen=True)
class LMConfig:
    kind: str = "lm"
    data: LMDataConfig = field(default_factory=LMDataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        need = longest_text(self.data.world_config())
        # a row holds context_length + 1 tokens: the inputs, and the last one's target
        if self.model.context_length + 1 < need:
            raise DifflabError(
                f"context_length {self.model.context_length} is too short for the '{self.data.world}' world's "
                f"longest texts ({need} tokens); expected at least {need - 1}"
            )


def longest_text(world: WorldConfig) -> int:
    """Tokens of the longest text the world says, <bos> and <eos> included: a full description of its most
    objects (9 per object, less one, :meth:`WordTokenizer.for_world`), or a question/answer line."""
    return max(9 * world.max_objects + 1, LONGEST_QA)


def resolve(cfg: LMConfig, *, attach: bool = True) -> LMConfig:
    """The run record: the vocabulary size from the tokenizer. (No parent run: ``attach`` is accepted for
    the family interface.)"""
    vocab = lm_tokenizer(cfg.model.context_length + 1).vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def make_tokenizer(cfg: LMConfig) -> WordTokenizer:
    """The run's tokenizer: rows of ``context_length + 1`` tokens, the inputs and the last target."""
    return lm_tokenizer(cfg.model.context_length + 1)


# ----------------------------------------------------------------------------------------------- data


class WorldText(Dataset):
    """Row i: ``{"ids", "mask"}`` (context_length + 1,), the texts of scenes ``i * per_row``, ``i * per_row
    + 1``, ... packed (or the one text of scene i, unpacked); :meth:`text` is scene k's text. Everything
    is a pure function of (data, seed, i), so a resumed run and every DDP rank read the same rows."""

    def __init__(self, data: LMDataConfig, tokenizer: WordTokenizer, *, seed: int | None = None):
        data = data if seed is None else dataclasses.replace(data, seed=seed)
        self.data, self.tokenizer, self.length = data, tokenizer, tokenizer.context_length
        self.world = data.world_config()
        self.scenes = captioned_scenes(data)  # scene k, redrawn while it shows a held-out pair
        self.per_row = self.length // 3 if data.pack else 1  # a text is at least <bos> word <eos>

    def __len__(self) -> int:
        return self.data.n

    def text(self, k: int) -> tuple[str, str]:
        """Scene k's text and its kind: 'caption', or the question's kind ('count', 'color', ...)."""
        scene = self.scenes.scene(k)
        rng = np.random.default_rng([self.data.seed, k, LM_TEXT])
        if rng.random() < self.data.qa_prob:
            qa = questions(scene, rng, 1, self.world)[0]
            return qa_text(qa.question, qa.answer), qa.kind
        return self.scenes.caption(k, scene).text, "caption"

    def tokens(self, k: int) -> torch.Tensor:
        """Scene k's text as ``<bos> ... <eos>`` (no padding)."""
        ids, mask = self.tokenizer.encode(self.text(k)[0])
        return ids[0, mask[0]]

    def __getitem__(self, i: int) -> dict:
        row = [self.tokens(i * self.per_row)]
        used = len(row[0])
        for k in range(i * self.per_row + 1, (i + 1) * self.per_row):
            nxt = self.tokens(k)
            if used + len(nxt) > self.length:
                break
            row.append(nxt)
            used += len(nxt)
        ids = torch.full((self.length,), self.tokenizer.pad_id, dtype=torch.long)
        ids[:used] = torch.cat(row)
        return {"ids": ids, "mask": torch.arange(self.length) < used}


def token_losses(model: GPT, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position negative log-likelihood of the next token and whether the model's top guess was it,
    both (B, L-1), zero where the next token is padding."""
    logits = model(ids[:, :-1], mask=mask[:, :-1])  # (B, L-1, V): position t predicts token t + 1
    target = ids[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none").view_as(target)
    keep = mask[:, 1:]
    return nll * keep, (logits.argmax(-1) == target) & keep


def loss_fn(model: GPT, batch: dict, generator: torch.Generator):
    """Next-token cross-entropy averaged over real tokens (padding ignored); logs the top-1 accuracy."""
    nll, hit = token_losses(model, batch["ids"], batch["mask"])
    count = batch["mask"][:, 1:].sum()
    return nll.sum() / count, {"token_acc": hit.sum() / count}


# -------------------------------------------------------------------------------------------- presets


PRESETS = (
    Preset(
        "lm_tiny",
        "lm",
        "GPT-2-style LM on the tiny world's text (2 shapes x 2 colours), width 32: learns in seconds (tests)",
        lambda: LMConfig(
            data=LMDataConfig(world="tiny", n=100_000, heldout_pairs=()),
            model=GPTConfig(context_length=32, width=32, depth=2, heads=2),
            train=TrainConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=10, weight_decay=0.1, ema_decay=None,
                              log_every=10, checkpoint_every=None, progress=False),
        ),
    ),
    Preset(
        "lm_world",
        "lm",
        "GPT-2-style LM (width 128, 4 layers, 96 positions) on scene32's captions and questions: "
        "about 4 minutes on one CPU thread",
        lambda: LMConfig(
            data=LMDataConfig(world="scene32"),
            model=GPTConfig(context_length=96, width=128, depth=4, heads=4),
            train=TrainConfig(steps=600, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.1, ema_decay=None,
                              lr_schedule="cosine", min_lr_ratio=0.1, log_every=25, checkpoint_every=200),
        ),
    ),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- run dirs


def load_config(run_dir: str | Path) -> LMConfig:
    return load_run_config(run_dir, LMConfig, "lm", "a language model (lm) run")


def load_model(run_dir: str | Path, *, device: str = "cpu") -> tuple[GPT, LMConfig]:
    """The trained GPT of a run (its newest good checkpoint, EMA weights when it kept them) and its
    config, in eval mode; its tokenizer is ``run_dir / "tokenizer.json"``."""
    cfg = load_config(run_dir)
    model = load_latest_weights(run_dir, GPT(cfg.model))
    return model.to(device).eval(), cfg


def train(cfg: LMConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train the LM into ``run_dir`` (config.json, tokenizer.json, checkpoints/, metrics.jsonl)."""
    cfg = resolve(cfg)
    with claim_run_dir(run_dir, cfg, resume, load_config) as run_dir:
        tokenizer = make_tokenizer(cfg)
        if is_main_process():
            tokenizer.save(run_dir / "tokenizer.json")
        torch.manual_seed(cfg.train.seed)  # the initial weights
        model = GPT(cfg.model)
        loader = make_loader(WorldText(cfg.data, tokenizer), cfg.train)
        trainer = Trainer(model, loss_fn, loader, cfg.train, run_dir, model_config=to_dict(cfg.model))
        trainer.fit(resume=resume)
    return run_dir


def info_network(cfg: LMConfig):
    """The GPT with an example batch of full rows, its loss the next-token cross-entropy (``difflab info``)."""
    b, m = cfg.train.batch_size, cfg.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.vocab_size, (b, m.context_length + 1), generator=g)
    inputs = {"ids": ids[:, :-1], "mask": torch.ones(b, m.context_length, dtype=torch.bool)}
    return GPT(m), inputs, lambda logits: F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


# ------------------------------------------------------------------------------------------ evaluation


ANSWER_FORMS: dict[str, frozenset[str]] = {
    "count": frozenset(str(k) for k in range(10)), "existence": frozenset({"yes", "no"}),
    "color": frozenset(COLORS), "shape": frozenset(ALL_SHAPES), "position": frozenset(POSITIONS),
}  # fmt: skip
"""The well-formed answers of each question kind, in any world: what :func:`difflab.world.language.answer`
can say (a count is a digit)."""


def _rate(hits: list[tuple[str, bool]]) -> dict:
    """Overall and per-kind share of True among (kind, ok) pairs, and the count."""
    out = {"overall": sum(ok for _, ok in hits) / len(hits)}
    for kind in QUESTION_KINDS:
        mine = [ok for k, ok in hits if k == kind]
        if mine:
            out[kind] = sum(mine) / len(mine)
    return out | {"prompts": len(hits)}


@torch.no_grad()
def evaluate(run_dir: str | Path, n: int = 500, *, seed: int = 0, batch_size: int = 256) -> dict:
    """On texts of held-out scenes (world seed :data:`EVAL_SEED` + ``seed``, drawn as the training texts
    are), each read alone from position 0:

    - ``loss_per_token`` (nats) and ``perplexity`` = exp(loss) over every token after ``<bos>`` (``<eos>``
      included) of ``n`` texts, ``next_token_accuracy`` (top-1), and the same for captions and question
      lines apart; ``unigram_loss_per_token``: the loss of predicting every token from its frequency in
      these texts (in-sample), what a model that learned nothing of word order would score;
    - ``answer_format``: of ``n`` question prompts (``<bos> question``), the share whose greedy
      continuation is a well-formed answer of that question's kind (:data:`ANSWER_FORMS`) ending in
      ``<eos>``; ``blind_answer_accuracy``: the share that is the scene's true answer, which a model
      without the image can only reach through the answers' prior (the floor a VLM must clear).
    """
    model, cfg = load_model(run_dir)
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    texts = WorldText(cfg.data, tokenizer, seed=EVAL_SEED + seed)
    drawn = [texts.text(k) for k in range(n)]
    sums = {group: torch.zeros(3) for group in ("all", "caption", "qa")}  # nll, top-1 hits, tokens
    counts = torch.zeros(tokenizer.vocab_size)  # of every predicted token, for the unigram loss
    for start in range(0, n, batch_size):
        chunk = drawn[start : start + batch_size]
        ids, mask = tokenizer.encode([t for t, _ in chunk])
        nll, hit = token_losses(model, ids, mask)
        counts += torch.bincount(ids[:, 1:][mask[:, 1:]], minlength=tokenizer.vocab_size)
        rows = torch.stack([nll.sum(1), hit.sum(1), mask[:, 1:].sum(1)], 1).double()  # (B, 3)
        for row, (_, kind) in zip(rows, chunk, strict=True):
            sums["all"] += row
            sums["caption" if kind == "caption" else "qa"] += row
    p = counts[counts > 0] / counts.sum()
    form, right = answer_checks(model, tokenizer, cfg.data, n, EVAL_SEED + seed, batch_size)
    return {"run": str(run_dir), "texts": n, "scenes": f"world '{cfg.data.world}' seed {EVAL_SEED + seed}",
            **_token_summary(sums["all"]), "unigram_loss_per_token": float(-(p * p.log()).sum()),
            "by_text": {k: _token_summary(sums[k]) for k in ("caption", "qa") if sums[k][2] > 0},
            "answer_format": _rate(form), "blind_answer_accuracy": _rate(right)}  # fmt: skip


def _token_summary(sums: torch.Tensor) -> dict:
    nll, hits, tokens = sums.tolist()
    return {"loss_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
            "next_token_accuracy": hits / tokens, "tokens": int(tokens)}  # fmt: skip


def answer_checks(model: GPT, tokenizer: WordTokenizer, data: LMDataConfig, n: int, seed: int,
                  batch_size: int = 256) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:  # fmt: skip
    """For one question about each of ``n`` scenes (world seed ``seed``): (kind, well-formed) and (kind,
    true) of the greedy continuation of ``<bos> question``."""
    scenes = captioned_scenes(dataclasses.replace(data, seed=seed))
    world = data.world_config()
    qas = [
        questions(scenes.scene(k), np.random.default_rng([seed, k, LM_TEXT]), 1, world)[0] for k in range(n)
    ]
    form, right = [], []
    for start in range(0, n, batch_size):
        chunk = qas[start : start + batch_size]
        ids, mask = prompt_ids(tokenizer, [qa.question for qa in chunk])
        # the longest answer ('top left') is two words; a third token must be <eos>
        new = model.generate(ids, mask=mask, max_new_tokens=3, eos_id=tokenizer.eos_id)
        for qa, tokens in zip(chunk, new, strict=True):
            said = tokenizer.decode(tokens)
            ended = len(tokens) < 3  # stopped at <eos>
            form.append((qa.kind, ended and said in ANSWER_FORMS[qa.kind]))
            right.append((qa.kind, ended and said == qa.answer))
    return form, right


FAMILY = Family(
    name="lm",
    what="a language model (lm) run",
    config=LMConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="tokenizer.json",
    eval_n=500,
)
