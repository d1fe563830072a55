"""The ``vlm`` family: image -> text models (LLaVA, Flamingo, BLIP-2/InstructBLIP) on the toy world, one config
with the switches the controlled comparison turns (docs/vlm.md).

A run is built on two parents, both trained here:

- ``vision``: a CLIP run (``difflab train --preset clip_demo``), whose ViT is frozen and read at its
  penultimate layer (LLaVA, Liu et al. 2023, Sec. 4.1); ``None`` trains a ViT from scratch with the rest;
- ``lm``: a language model pretrained on the world's text (``difflab train --preset lm_world``, the
  ``lm`` family), ``frozen``, adapted by LoRA (Hu et al. 2021) or trained in ``full``; ``None`` starts it
  from scratch.

Between them a ``connector`` (linear, mlp, perceiver, qformer) and a ``fusion`` (autoregressive, or
Flamingo's gated cross-attention), see :mod:`difflab.models.vlm_network`.

**Two-stage training** (LLaVA Sec. 4.2) is two runs: stage 1 trains the connector alone on captions
(``lm_mode='frozen'``, ``data.caption_prob=1``), stage 2 starts from it (``init=STAGE1_RUN``) and trains
the connector and the LM on questions and captions. One-stage training is stage 2 without ``init``.

Judged exactly by :mod:`difflab.models.vlm_eval`: VQA per question kind, captions parsed back into the
world's objects (precision, recall, CHAIR), and POPE's yes/no probes of absent objects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.config import to_dict
from difflab.data.vqa import VQADataConfig, VQAScenes, collate
from difflab.errors import MAX_SIZE, DifflabError, check_choice, check_float, check_int
from difflab.models import clip, lm, vlm_eval, vlm_grounding
from difflab.models.family import Family, Preset
from difflab.models.runs import checkpoint_id, claim_run_dir, load_latest_weights, load_run_config
from difflab.models.vlm_loss import instruction_ids, make_loss_fn
from difflab.models.vlm_network import (
    CAPTION_PROMPT,
    FUSIONS,
    VisionLanguageModel,
    check_dense_layer,
    prompt_length,
)
from difflab.nn.connectors import CONNECTORS
from difflab.nn.gpt import GPT, GPTConfig
from difflab.nn.lora import add_lora
from difflab.nn.qformer import stage1_losses
from difflab.nn.vit import VisionTransformer, ViTConfig
from difflab.train.config import TrainConfig
from difflab.train.trainer import Trainer, make_loader

LM_MODES = ("frozen", "lora", "full")
OBJECTIVES = ("lm", "qformer")
LOSS_AVERAGES = ("token", "example")


@dataclass(frozen=True)
class VLMConfig:
    kind: str = "vlm"
    data: VQADataConfig = field(default_factory=VQADataConfig)
    vision: str | None = None
    """A CLIP run whose ViT is the (frozen) vision encoder; None: a ViT of ``vision_scratch``, trained."""
    vision_checkpoint: str | None = None
    """Set by resolve: the CLIP run's checkpoint id."""
    vision_scratch: ViTConfig = field(default_factory=lambda: ViTConfig(
        image_size=32, patch_size=4, width=64, depth=4, heads=2, stem="conv"))  # fmt: skip
    """The ViT trained from scratch when ``vision`` is None (clip_demo's tower); set from the CLIP run
    otherwise."""
    vision_layer: int = -2
    """The ViT block whose patch tokens the connector reads: -2 is the penultimate (LLaVA's choice)."""
    dense_layers: tuple[int, ...] = ()
    """Earlier ViT blocks whose patch tokens are concatenated to ``vision_layer``'s along channels before the
    connector: the Dense Connector's sparse channel integration (Yao et al. 2024, Sec. 3.2). A frozen CLIP's
    penultimate tokens each carry the whole scene (a token inside one object names the other's shape nearly as
    well as its own, docs/vlm.md), so early blocks give the LM what sits where."""
    lm: str | None = None
    """An lm run (the world's text) whose GPT is the language model; None: a GPT of ``lm_model`` from scratch."""
    lm_checkpoint: str | None = None
    lm_model: GPTConfig = field(default_factory=lambda: GPTConfig(context_length=64, width=128, depth=4, heads=4))
    """The LM's shape: set from the lm run, except ``context_length``, which must hold the visual tokens and
    the text (positions beyond the lm run's are new rows, trained in stage 2)."""
    lm_mode: str = "full"
    """'frozen' (only the connector, and Flamingo's layers, learn), 'lora' (plus rank-``lora_rank`` adapters on
    the LM's attention), 'full'."""
    lora_rank: int = 8
    connector: str = "mlp"
    fusion: str = "autoregressive"
    visual_tokens: int = 16
    """K, the visual tokens the LM reads: 64 = every patch of a 32x32 image at patch 4; fewer are pooled
    (linear, mlp) or are the resampler's latents / the Q-Former's queries."""
    visual_positions: bool = False
    """A learned embedding per visual token, at the tokens' own scale, added to the connector's output: an
    experiment on position questions (the GPT's additive position embedding is 20 times smaller than a visual
    token); measured, it did not help them (docs/vlm.md)."""
    cross_every: int = 1
    """Flamingo: a gated cross-attention layer before every n-th LM block."""
    instruct: bool = False
    """InstructBLIP: the Q-Former also reads the question (connector 'qformer' only)."""
    objective: str = "lm"
    """'lm': next-token loss on the answers and captions (every design); 'qformer': BLIP-2's first stage
    (Sec. 3.2), the Q-Former alone on captions with its three losses (ITC, ITM, ITG), the LM untouched."""
    init: str | None = None
    """A vlm run (stage 1) whose weights this run starts from."""
    init_checkpoint: str | None = None
    grounding: float = 0.0
    """Weight of the grounding loss (:mod:`difflab.models.vlm_grounding`): the words that name an object (a
    colour, shape or position question's phrase end, a caption mention's size, colour and noun) sent, by their
    attention in LM blocks 1 and up, to the visual tokens of that object (the renderer's masks; TokenCompose's
    token loss). 0: off, the LM loss alone. A training signal
    only; needs the autoregressive fusion of a pooled patch grid (connector linear or mlp)."""
    grounding_kinds: tuple[str, ...] = vlm_grounding.DEFAULT_KINDS
    """The turns ``grounding`` supervises, of :data:`~difflab.models.vlm_grounding.GROUNDABLE`: 'color',
    'shape', 'position', 'count', 'existence' (questions) and 'caption'."""
    loss_average: str = "token"
    """'token': the loss is the mean over every answer and caption token of a batch (LLaVA); 'example': each
    sequence's mean first, so a one-word answer counts as much as a caption."""
    text_length: int = 24
    """Text tokens per row: <bos>, the question or :data:`CAPTION_PROMPT`, the answer or caption, <eos>."""
    max_new_tokens: int = 32
    """Longest answer or caption :func:`answer` and :func:`caption` write."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check_choice("connector", self.connector, CONNECTORS)
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("lm_mode", self.lm_mode, LM_MODES)
        check_int("visual_tokens", self.visual_tokens, 1, MAX_SIZE)
        check_int("cross_every", self.cross_every, 1, MAX_SIZE)
        check_int("lora_rank", self.lora_rank, 1, MAX_SIZE)
        check_int("text_length", self.text_length, 4, MAX_SIZE)
        check_int("max_new_tokens", self.max_new_tokens, 1, MAX_SIZE)
        check_int("vision_layer", self.vision_layer, -MAX_SIZE, MAX_SIZE)  # negative: from the last block
        for layer in self.dense_layers:
            check_int("dense layer", layer, -MAX_SIZE, MAX_SIZE)
        if self.instruct and self.connector != "qformer":
            raise DifflabError(f"instruct=true feeds the question to a Q-Former; connector is '{self.connector}'")
        if (self.instruct or self.objective == "qformer") and self.data.turns != 1:
            raise DifflabError(f"data.turns {self.data.turns}: a Q-Former reads one text per image (InstructBLIP's "
                               "question, BLIP-2's caption); expected data.turns=1")  # fmt: skip
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("loss_average", self.loss_average, LOSS_AVERAGES)
        check_float("grounding", self.grounding, 0.0, MAX_SIZE)
        for kind in self.grounding_kinds:
            check_choice("grounding kind", kind, vlm_grounding.GROUNDABLE)
        if self.grounding and (self.fusion != "autoregressive" or self.connector not in ("linear", "mlp")):
            raise DifflabError(f"grounding {self.grounding:g} supervises the LM's attention over a pooled patch "
                               f"grid; expected fusion=autoregressive and connector linear or mlp, got "
                               f"{self.fusion} and {self.connector}")  # fmt: skip
        if self.objective == "qformer" and (self.connector != "qformer" or self.lm_mode != "frozen"
                                            or self.data.caption_prob != 1.0):  # fmt: skip
            raise DifflabError(f"objective 'qformer' trains a Q-Former on captions with the LM frozen; expected "
                               f"connector=qformer, lm_mode=frozen and data.caption_prob=1, got "
                               f"{self.connector}, {self.lm_mode}, {self.data.caption_prob:g}")  # fmt: skip


def resolve(cfg: VLMConfig, *, attach: bool = True) -> VLMConfig:
    """The run record: with ``attach``, the CLIP run's ViT config and checkpoint, the lm run's GPT shape and
    checkpoint, the init run's checkpoint; the LM's vocabulary from the tokenizer; sequence lengths checked."""
    vocab = lm.lm_tokenizer(cfg.text_length).vocab_size
    model = dataclasses.replace(cfg.lm_model, vocab_size=vocab)
    cfg = dataclasses.replace(cfg, lm_model=model)
    if attach and cfg.vision is not None:
        path = Path(cfg.vision).expanduser().resolve()
        vision = clip.load_config(path).vision
        if vision.image_size != cfg.data.world_config().resolution:
            raise DifflabError(f"CLIP run '{path}' sees {vision.image_size}px images; the '{cfg.data.world}' world "
                               f"draws {cfg.data.world_config().resolution}px ones")  # fmt: skip
        cfg = dataclasses.replace(cfg, vision=str(path), vision_scratch=vision,
                                  vision_checkpoint=checkpoint_id(path, "CLIP run"))  # fmt: skip
    if attach and cfg.lm is None and cfg.lm_mode != "full":
        raise DifflabError(f"lm_mode '{cfg.lm_mode}' keeps an LM trained from scratch untrained; give "
                           "--set lm=RUN (difflab train --preset lm_world) or lm_mode=full")  # fmt: skip
    if attach and cfg.lm is not None:
        path = Path(cfg.lm).expanduser().resolve()
        pre = lm.load_config(path).model
        model = dataclasses.replace(pre, context_length=cfg.lm_model.context_length)
        cfg = dataclasses.replace(cfg, lm=str(path), lm_model=model, lm_checkpoint=checkpoint_id(path, "lm run"))
    if attach and cfg.init is not None:
        path = Path(cfg.init).expanduser().resolve()
        cfg = dataclasses.replace(cfg, init=str(path), init_checkpoint=checkpoint_id(path, "vlm run"))
    depth = cfg.vision_scratch.depth
    if not -depth <= cfg.vision_layer < depth:
        raise DifflabError(f"vision_layer {cfg.vision_layer} is outside the ViT's {depth} blocks; expected "
                           f"{-depth}..{depth - 1}")  # fmt: skip
    for layer in cfg.dense_layers:
        check_dense_layer(layer, depth, cfg.vision_layer % depth)
    longest = lm.longest_text(cfg.data.world_config()) + prompt_length(CAPTION_PROMPT) - 1
    if cfg.text_length < longest:
        raise DifflabError(f"text_length {cfg.text_length} cannot hold the '{cfg.data.world}' world's longest "
                           f"caption after '{CAPTION_PROMPT}'; expected at least {longest}")  # fmt: skip
    text = cfg.data.turns * cfg.text_length  # a conversation's row, at most
    need = text + (cfg.visual_tokens if cfg.fusion == "autoregressive" else 0)
    if cfg.lm_model.context_length < need:
        raise DifflabError(f"lm_model.context_length {cfg.lm_model.context_length} is too short for "
                           f"{cfg.visual_tokens} visual tokens and {text} text tokens ({cfg.data.turns} "
                           f"turn(s) of text_length {cfg.text_length}); expected at least {need}")  # fmt: skip
    return cfg


def make_tokenizer(cfg: VLMConfig):
    """The LM's word tokenizer, rows of ``text_length`` tokens."""
    return lm.lm_tokenizer(cfg.text_length)


def build_network(cfg: VLMConfig, vision: VisionTransformer | None = None, language: GPT | None = None,
                  *, lora: bool = True) -> VisionLanguageModel:  # fmt: skip
    """The architecture of a record around ``vision`` and ``language`` (fresh ones when None), with LoRA
    adapters on the LM for ``lm_mode='lora'`` unless ``lora`` is False."""
    model = VisionLanguageModel(
        vision or VisionTransformer(cfg.vision_scratch), language or GPT(cfg.lm_model), connector=cfg.connector,
        fusion=cfg.fusion, visual_tokens=cfg.visual_tokens, vision_layer=cfg.vision_layer,
        freeze_vision=cfg.vision is not None, cross_every=cfg.cross_every, instruct=cfg.instruct,
        visual_positions=cfg.visual_positions, dense_layers=cfg.dense_layers)  # fmt: skip
    if cfg.lm_mode == "lora" and lora:
        add_lora(model.lm, cfg.lora_rank)
    return model


def _initial_network(cfg: VLMConfig) -> VisionLanguageModel:
    """The network a training starts from: the parents' weights loaded (CLIP's ViT, the lm run's GPT, or
    every weight of the init run), then frozen and adapted as ``lm_mode`` says."""
    if cfg.init is not None:
        init_cfg = load_config(cfg.init)
        if init_cfg.lm_mode == "lora":
            raise DifflabError(f"init run '{cfg.init}' adapts its LM with LoRA; stage 2 starts from a stage-1 run "
                               "(lm_mode frozen or full)")  # fmt: skip
        model = load_latest_weights(cfg.init, build_network(cfg, lora=False), ema=True)
    else:
        vision = VisionTransformer(cfg.vision_scratch)
        if cfg.vision is not None:
            encoder = load_latest_weights(cfg.vision, clip.CLIP(clip.load_config(cfg.vision)), ema=True)
            vision.load_state_dict(encoder.visual.state_dict())
        language = GPT(cfg.lm_model)
        if cfg.lm is not None:
            _load_lm(language, cfg.lm)
        model = build_network(cfg, vision, language, lora=False)
    if cfg.lm_mode == "frozen":
        model.lm.requires_grad_(False)
    elif cfg.lm_mode == "lora":
        model.lm.requires_grad_(False)
        add_lora(model.lm, cfg.lora_rank)  # only the adapters train
    for p in model.unused_parameters(cfg.objective):
        p.requires_grad_(False)
    return model


def _load_lm(target: GPT, run_dir: str) -> None:
    """The lm run's weights into ``target``, whose position table may be longer: the rows it has are copied,
    the rest keep their initialisation."""
    pre, _ = lm.load_model(run_dir)
    state = pre.state_dict()
    wpe = target.wpe.weight.detach().clone()
    n = min(len(wpe), len(state["wpe.weight"]))
    wpe[:n] = state["wpe.weight"][:n]
    state["wpe.weight"] = wpe
    target.load_state_dict(state)


def _model_config(cfg: VLMConfig) -> dict:
    d = to_dict(cfg)
    keys = ("vision_scratch", "vision_layer", "dense_layers", "lm_model", "lm_mode", "lora_rank", "connector", "fusion",
            "visual_tokens", "visual_positions", "cross_every", "instruct", "objective")  # fmt: skip
    return {k: d[k] for k in keys}


def train(cfg: VLMConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train into ``run_dir`` (config.json, checkpoints/, metrics.jsonl)."""
    cfg = resolve(cfg)
    with claim_run_dir(run_dir, cfg, resume, load_config,
                       inputs=("vision_checkpoint", "lm_checkpoint", "init_checkpoint")) as run_dir:  # fmt: skip
        torch.manual_seed(cfg.train.seed)  # the connector's initial weights
        model = _initial_network(cfg)
        tokenizer = make_tokenizer(cfg)
        data = VQAScenes(cfg.data)
        if cfg.grounding:
            side = math.isqrt(cfg.visual_tokens)
            data = vlm_grounding.WithObjectMasks(data, side, tokenizer, cfg.text_length, cfg.grounding_kinds)
        loader = make_loader(data, cfg.train, collate_fn=vlm_grounding.collate_grounded if cfg.grounding else collate)
        trainer = Trainer(model, make_loss_fn(cfg, tokenizer), loader, cfg.train, run_dir,
                          model_config=_model_config(cfg))  # fmt: skip
        trainer.fit(resume=resume)
    return run_dir


def load_config(run_dir: str | Path) -> VLMConfig:
    return load_run_config(run_dir, VLMConfig, "vlm", "a vision-language (vlm) run")


def load_model(run_dir: str | Path, *, ema: bool = True, device: str = "cpu") -> tuple[VisionLanguageModel, VLMConfig]:
    """The trained model (EMA weights by default) in eval mode, and its record."""
    cfg = load_config(run_dir)
    model = load_latest_weights(run_dir, build_network(cfg), ema=ema)
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------- use


def _generate(model: VisionLanguageModel, cfg: VLMConfig, images: torch.Tensor, prompts: list[str]) -> list[str]:
    tokenizer = make_tokenizer(cfg)
    for p in prompts:
        if prompt_length(p) + 1 > cfg.text_length:
            raise DifflabError(f"the question '{p}' has {prompt_length(p) - 1} tokens; this model reads at most "
                               f"{cfg.text_length - 2}")  # fmt: skip
    ids, mask = tokenizer.encode(prompts)  # unknown words are a named error here
    rows = [row[: int(m.sum()) - 1].tolist() for row, m in zip(ids, mask, strict=True)]  # <bos> prompt, no <eos>
    device = next(model.parameters()).device
    instruction = instruction_ids(tokenizer, prompts, device) if cfg.instruct else None
    new = model.generate(images.to(device), rows, max_new_tokens=cfg.max_new_tokens, max_length=cfg.text_length,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, instruction=instruction)  # fmt: skip
    return [tokenizer.decode(t) for t in new]


def answer(model: VisionLanguageModel, cfg: VLMConfig, images: torch.Tensor, questions: list[str]) -> list[str]:
    """Greedy answers to one question per image: images (B, 3, S, S) in [-1, 1]."""
    if len(questions) != len(images):
        raise DifflabError(f"{len(questions)} questions for {len(images)} images; expected one per image")
    return _generate(model, cfg, images, list(questions))


def caption(model: VisionLanguageModel, cfg: VLMConfig, images: torch.Tensor) -> list[str]:
    """Greedy captions: the continuation of :data:`CAPTION_PROMPT` after each image."""
    return _generate(model, cfg, images, [CAPTION_PROMPT] * len(images))


def evaluate(run_dir: str | Path, n: int = 500, *, seed: int = 0, progress: bool = False) -> dict:
    """VQA, captions and POPE on ``n`` held-out cases each (:func:`difflab.models.vlm_eval.evaluate_vlm`)."""
    model, cfg = load_model(run_dir)
    bar = tqdm(desc="answering", disable=not progress, leave=False)

    def answer_fn(images, questions):
        bar.update(len(questions))
        return answer(model, cfg, images, questions)

    def caption_fn(images):
        bar.update(len(images))
        return caption(model, cfg, images)

    with torch.no_grad():
        report = vlm_eval.evaluate_vlm(answer_fn, caption_fn, cfg.data.world_config(), n, seed,
                                       heldout=cfg.data.pairs())  # fmt: skip
    bar.close()
    trainable = {k: v for k, v in _model_config(cfg).items() if k in ("connector", "fusion", "visual_tokens",
                                                                       "lm_mode", "instruct")}  # fmt: skip
    return {"run": str(run_dir), "design": trainable, "n": n, **report}


def info_network(cfg: VLMConfig):
    """The network as a training holds it (frozen parts frozen, parents' weights left out) with an example batch
    (``difflab info``); for BLIP-2's first stage, the Q-Former's summed losses are the output."""
    b, side = 2, cfg.vision_scratch.image_size
    model = build_network(cfg)
    if cfg.lm_mode != "full":
        for n, p in model.lm.named_parameters():
            p.requires_grad_("lora" in n)
    for p in model.unused_parameters(cfg.objective):
        p.requires_grad_(False)
    tokenizer = make_tokenizer(cfg)
    ids, mask = tokenizer.encode(["describe the image . a red circle"] * b)
    inputs = {"images": torch.zeros(b, 3, side, side), "ids": ids, "mask": mask}
    if cfg.instruct:  # InstructBLIP's Q-Former reads the question too
        inputs["instruction"] = tokenizer.encode(["how many circles?"] * b)
    if cfg.objective == "qformer":
        return _FirstStage(model), inputs, lambda out: out
    return model, inputs, None


class _FirstStage(torch.nn.Module):
    """BLIP-2's first stage as one module, for ``difflab info``: (images, ids, mask) -> the summed losses."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, images, ids, mask):
        return sum(stage1_losses(self.model.connector, self.model.features(images), ids, mask).values())


# --------------------------------------------------------------------------------------------- presets


PRESETS = (
    Preset(
        "vlm_tiny",
        "vlm",
        "a tiny LLaVA (MLP connector, 4 visual tokens) on the 16x16 tiny world, ViT and LM from scratch: seconds "
        "(tests)",
        lambda: VLMConfig(
            data=VQADataConfig(world="tiny", n=4096, heldout_pairs=()),
            vision_scratch=ViTConfig(image_size=16, patch_size=4, width=32, depth=2, heads=2),
            lm_model=GPTConfig(context_length=32, width=32, depth=2, heads=2),
            connector="mlp", visual_tokens=4, text_length=24, max_new_tokens=20,
            train=TrainConfig(steps=400, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=None, log_every=50,
                              checkpoint_every=None, progress=False),
        ),  # fmt: skip
    ),
    Preset(
        "vlm_llava",
        "vlm",
        "LLaVA-1.5 on scene32: an MLP connector, 16 visual tokens, the world's LM (--set lm=RUN of lm_world) trained "
        "in full, one stage; the ViT a frozen CLIP's (--set vision=RUN of clip_demo) or, without one, trained from "
        "scratch: about 14 minutes on one CPU thread (docs/vlm.md: 0.90 of held-out questions)",
        lambda: _scene32(),
    ),
    Preset(
        "vlm_grounded",
        "vlm",
        "the best design (docs/vlm.md): vlm_llava whose question and caption words are taught to attend to the "
        "object they name (grounding=1, from the renderer's masks), reading CLIP's first block beside its "
        "penultimate (dense_layers=0), half of its 'no' existence questions attribute swaps (LRV-Instruction's hard "
        "negatives), 64 conversations a batch (--set vision=RUN --set lm=RUN): about 30 minutes on one CPU thread "
        "beside another run (docs/vlm.md: 0.98-0.99 of held-out questions, CHAIR_i 0.007-0.023, POPE adversarial "
        "0.97-0.99)",
        lambda: _scene32(batch=64, swaps=0.5, grounding=1.0, grounding_kinds=vlm_grounding.DEFAULT_KINDS,
                         dense_layers=(0,)),  # fmt: skip
    ),
    Preset(
        "vlm_llava_stage1",
        "vlm",
        "LLaVA's first stage (feature alignment, Sec. 4.2): the MLP connector alone on captions, the LM frozen "
        "(--set vision=RUN --set lm=RUN); stage 2 is vlm_llava with --set init=THIS_RUN",
        lambda: _scene32(lm_mode="frozen", caption=1.0),
    ),
    Preset(
        "vlm_flamingo",
        "vlm",
        "Flamingo: a perceiver resampler (16 latents) and gated cross-attention before every block of the frozen "
        "world LM, tanh gates from 0 (--set vision=RUN --set lm=RUN)",
        lambda: _scene32(connector="perceiver", fusion="cross_attention", lm_mode="frozen"),
    ),
    Preset(
        "vlm_blip2_stage1",
        "vlm",
        "BLIP-2's first stage: the Q-Former (16 queries) alone on captions with ITC, ITM and ITG over the frozen "
        "ViT (--set vision=RUN --set lm=RUN: the LM is carried, untouched); stage 2 is vlm_blip2",
        lambda: _scene32(connector="qformer", objective="qformer", lm_mode="frozen", caption=1.0, turns=1, batch=64),
    ),
    Preset(
        "vlm_blip2",
        "vlm",
        "BLIP-2's second stage: the Q-Former's queries projected into the frozen LM as a soft prompt, trained on "
        "questions and captions (--set init=RUN of vlm_blip2_stage1)",
        lambda: _scene32(connector="qformer", lm_mode="frozen"),
    ),
    Preset(
        "vlm_instructblip",
        "vlm",
        "InstructBLIP: vlm_blip2 whose Q-Former also reads the question (--set init=RUN of vlm_blip2_stage1)",
        lambda: _scene32(connector="qformer", lm_mode="frozen", instruct=True, turns=1, batch=64),
    ),
)


def _scene32(caption: float | None = None, turns: int = 4, batch: int = 32, swaps: float = 0.0, **kw) -> VLMConfig:
    """The scene32 designs' shared data and training: the same steps, batch and schedule for every design of the
    comparison (docs/vlm.md). Rows are four-turn conversations about one image (LLaVA's multi-turn data): 32 of
    them cost a step what 64 one-text rows did and teach twice the answers: VQA 0.78 against 0.72 after 1,500
    steps, 0.90 against 0.86 after 3,000 (docs/vlm.md). A Q-Former reads one text per image, so its
    first stage and InstructBLIP keep one-text rows, 64 a batch. ``swaps``: ``data.existence_swaps``."""
    data = VQADataConfig(world="scene32", turns=turns, existence_swaps=swaps,
                         **({} if caption is None else {"caption_prob": caption}))  # fmt: skip
    # 16 visual tokens and four turns of 24 for every design, so that a stage-2 run loads its stage 1's table
    model = GPTConfig(context_length=16 + 4 * 24, width=128, depth=4, heads=4)
    return VLMConfig(data=data, visual_tokens=16, lm_model=model, **{"connector": "mlp", "lm_mode": "full", **kw},
                     train=TrainConfig(steps=3000, batch_size=batch, lr=1e-3, warmup_steps=100, lr_schedule="cosine",
                                       ema_decay=None, log_every=50, checkpoint_every=500))  # fmt: skip


FAMILY = Family(
    name="vlm",
    what="a vision-language (vlm) run",
    config=VLMConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="nothing else",
    eval_n=500,
    eval_options=("progress",),
    parents=("vision", "lm"),
)
