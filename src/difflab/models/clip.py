"""CLIP (Radford et al. 2021): an image tower and a text tower trained so that a scene and its caption
land close together in one embedding space, and other captions far away.

    image -> ViT -> pooled -> W_i -> l2-normalise -> I_e (N, E)
    text  -> tokenizer -> causal transformer -> [EOS] state -> W_t -> l2-normalise -> T_e (N, E)
    logits = exp(t) * I_e T_e^T                                   (N, N): pair (i, j) is image i, text j
    loss   = (CE(logits, rows -> diagonal) + CE(logits^T, columns -> diagonal)) / 2      (Figure 3)

The temperature is learned as ``t = log(1/tau)``, initialised at tau = 0.07 and clipped so that the
logits are never scaled by more than 100 (Sec. 2.5). On the toy world a caption is either the scene's
full description ("a small red circle at the top left and a large blue square in the center") or a
random true caption of any style, so the model must read colour, shape, size and position.

Under DDP every process embeds its own shard; :func:`difflab.train.distributed.all_gather_with_grad`
concatenates the embeddings of all shards so that each process scores the full global N x N matrix, as
a single process would (tested in tests/test_models_clip.py).
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
from torch import nn

from difflab.config import to_dict
from difflab.data.captioned import CLIP_CAPTIONS, Caption, CaptionedScenes, Captioner
from difflab.errors import MAX_COUNT, MAX_SIZE, DifflabError, check_choice, check_float, check_int, check_seed
from difflab.models import clip_eval
from difflab.models.family import Family, Preset
from difflab.models.runs import claim_run_dir, load_latest_weights, load_run_config
from difflab.nn.text_transformer import TextTransformer, TextTransformerConfig
from difflab.nn.vit import VisionTransformer, ViTConfig
from difflab.text.tokenizer import WordTokenizer, load_tokenizer
from difflab.train.config import TrainConfig
from difflab.train.device import is_main_process
from difflab.train.distributed import all_gather_with_grad
from difflab.train.trainer import Trainer, make_loader
from difflab.world.language import caption, contrast, description
from difflab.world.scene import Scene, world_preset

UNKNOWN_WORDS = ("strict", "lenient")


@dataclass(frozen=True)
class CLIPDataConfig:
    world: str = "scene32"
    """Toy-world preset of the training scenes (scene32: one or two objects)."""
    n: int = 100_000
    seed: int = 0
    describe_prob: float = 0.5
    """Probability that an item's caption is the scene's full description; otherwise a random true caption
    of any style ('two green circles', 'a red circle to the left of a square', ...)."""
    hard_negatives: bool = False
    """Give every item a false caption one edit away from its true one (NegCLIP; see ``clip_loss``)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.describe_prob <= 1.0:
            raise DifflabError(
                f"describe_prob {self.describe_prob} is invalid; expected a probability in [0, 1]"
            )
        check_int("n", self.n, 1, MAX_COUNT)
        check_seed("seed", self.seed)


@dataclass(frozen=True)
class CLIPConfig:
    kind: str = "clip"
    data: CLIPDataConfig = field(default_factory=CLIPDataConfig)
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextTransformerConfig = field(default_factory=TextTransformerConfig)
    embed_dim: int = 128
    """Width of the shared embedding space (the projections W_i, W_t map into it)."""
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    unknown_words: str = "strict"
    """Words outside the toy world's vocabulary: 'strict' (an error naming them) or 'lenient' (<unk>)."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check_choice("unknown-word policy", self.unknown_words, UNKNOWN_WORDS)
        check_int("embed_dim", self.embed_dim, 1, MAX_SIZE)
        check_float("init_temperature", self.init_temperature, 0.0, lo_open=True)
        check_float("max_logit_scale", self.max_logit_scale, 0.0, lo_open=True)
        if not self.max_logit_scale >= 1.0 / self.init_temperature:
            raise DifflabError(
                f"max_logit_scale {self.max_logit_scale} is below the initial 1/temperature "
                f"{1.0 / self.init_temperature:.3g}; expected a larger cap"
            )


def resolve(cfg: CLIPConfig, *, attach: bool = True) -> CLIPConfig:
    """The run record of a request: the towers' input sizes follow from the data and the tokenizer, so
    that --set data.world=... cannot leave a network built for another image size or vocabulary. (No
    parent run: ``attach`` is accepted for the family interface.)"""
    world = world_preset(cfg.data.world)
    vision = dataclasses.replace(cfg.vision, image_size=world.resolution)
    text = dataclasses.replace(cfg.text, vocab_size=world_tokenizer(cfg.text.context_length).vocab_size)
    return dataclasses.replace(cfg, vision=vision, text=text)


@functools.lru_cache(maxsize=8)
def world_tokenizer(context_length: int, unknown: str = "strict") -> WordTokenizer:
    """The word tokenizer over everything the toy world says (built once per process)."""
    return WordTokenizer.for_world(context_length=context_length, unknown=unknown)


def make_tokenizer(cfg: CLIPConfig) -> WordTokenizer:
    return world_tokenizer(cfg.text.context_length, cfg.unknown_words)


# ---------------------------------------------------------------------------------------------- model


class CLIP(nn.Module):
    """Both towers, their projections and the learned temperature."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        # Bias-free projections, as in Figure 3 (W_i, W_t) and OpenAI's implementation.
        self.image_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, E), unit length."""
        pooled, _ = self.visual(images)
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, L) -> (B, E), unit length."""
        pooled, _ = self.text(ids, mask)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(t), clipped at ``max_logit_scale`` (Sec. 2.5); past the cap t gets no gradient."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(self, images, ids, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(ids, mask), self.scale()


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    text_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """The symmetric cross-entropy of Radford et al. (2021, Figure 3) over unit-length embeddings (N, E):
    the mean of the image->text and text->image losses, each with the diagonal as the right answer.

    ``text_negatives`` (M, E): extra captions that match no image (NegCLIP, Yuksekgonul et al. 2023,
    Sec. 4). They join the candidates of the image->text direction only, (N, N + M), so each image must
    also rank its true caption above near-copies of it; the text->image direction is unchanged.
    """
    logits = logit_scale * image_emb @ text_emb.T  # (N, N): row i = image i against every text
    labels = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = logits
    if text_negatives is not None:
        image_to_text = torch.cat([logits, logit_scale * image_emb @ text_negatives.T], dim=1)  # (N, N + M)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(logits.T, labels)) / 2


def make_loss_fn():
    """``loss_fn(model, batch, generator)`` for the trainer; under DDP it scores the global batch."""

    def loss_fn(model: CLIP, batch: dict, generator: torch.Generator):
        image_emb, text_emb, scale = model(batch["image"], batch["ids"], batch["mask"])
        image_emb, text_emb = all_gather_with_grad(image_emb), all_gather_with_grad(text_emb)
        negatives = None
        if "neg_ids" in batch:
            negatives = all_gather_with_grad(model.encode_text(batch["neg_ids"], batch["neg_mask"]))
        loss = clip_loss(image_emb, text_emb, scale, negatives)
        with torch.no_grad():  # in-batch retrieval accuracy, image -> text: the curve to watch
            n = len(image_emb)
            hits = (image_emb @ text_emb.T).argmax(dim=1) == torch.arange(n, device=loss.device)
        # InfoNCE bounds the mutual information of image and caption: I >= log N - loss, in nats (van den
        # Oord et al. 2018, Sec. 2.3; it holds for each direction). So the bound can never pass log N.
        return loss, {"batch_acc": hits.float().mean(), "logit_scale": scale.detach(),
                      "mi_bound": math.log(n) - loss.detach()}  # fmt: skip

    return loss_fn


# ----------------------------------------------------------------------------------------------- data


def captioner(data: CLIPDataConfig) -> Captioner:
    """CLIP's captions: the full description with probability ``describe_prob``, else a random true caption
    of any style; with ``hard_negatives``, a false caption one edit away."""
    world = world_preset(data.world)

    def caption_of(scene: Scene, rng: np.random.Generator) -> Caption:
        prompt = description(scene) if rng.random() < data.describe_prob else caption(scene, rng)[1]
        if not data.hard_negatives:
            return Caption(prompt.text(), prompt)
        # A caption such as 'a circle' in a scene of a circle and a square may have no false neighbour
        # that the world can draw; the full description always has one.
        negative = contrast(prompt, scene, rng, world) or contrast(description(scene), scene, rng, world)
        if negative is None:
            raise DifflabError(f"no false caption found for toy scene {scene}; this is a bug")
        return Caption(prompt.text(), prompt, negative.text())

    return caption_of


def captioned_scenes(data: CLIPDataConfig, tokenizer, *, with_text: bool = False) -> CaptionedScenes:
    """The training pairs: ``{"image", "ids", "mask"}`` (+ ``"neg_ids"``, ``"neg_mask"`` with hard
    negatives; + the strings with ``with_text``), the toy dataset's own scenes with CLIP's captions."""
    return CaptionedScenes(world_preset(data.world), data.n, data.seed, captioner(data), stream=CLIP_CAPTIONS,
                           tokenizer=tokenizer, with_text=with_text)  # fmt: skip


# -------------------------------------------------------------------------------------------- presets


PRESETS = (
    Preset(
        "clip_tiny",
        "clip",
        "CLIP on the 16x16 tiny world (2 shapes x 2 colours): learns in seconds (tests)",
        lambda: CLIPConfig(
            data=CLIPDataConfig(world="tiny", n=4096),
            vision=ViTConfig(patch_size=4, width=32, depth=2, heads=2),
            text=TextTransformerConfig(context_length=16, width=32, depth=1, heads=2),
            embed_dim=32,
            train=TrainConfig(steps=120, batch_size=64, lr=2e-3, warmup_steps=10, weight_decay=0.1, ema_decay=None,
                              log_every=10, checkpoint_every=None, progress=False),
        ),
    ),
    # clip_demo: what it reaches and how long it takes are in docs/clip.md.
    Preset(
        "clip_demo",
        "clip",
        "CLIP on 32x32 scenes of one or two objects: zero-shot colour and shape, retrieval; minutes on a CPU",
        lambda: CLIPConfig(
            data=CLIPDataConfig(world="scene32", hard_negatives=True),
            vision=ViTConfig(patch_size=4, width=64, depth=4, heads=2, stem="conv", pool="max"),
            text=TextTransformerConfig(context_length=24, width=64, depth=2, heads=2),
            embed_dim=64,
            train=TrainConfig(steps=3000, batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.1, ema_decay=None,
                              lr_schedule="cosine", min_lr_ratio=0.1, log_every=25, checkpoint_every=250),
        ),
    ),
    Preset(
        "clip_t2i",
        "clip",
        "a small CLIP on 32x32 scenes of one or two objects, trained for its text tower (text-to-image): about 1 min",
        lambda: CLIPConfig(
            data=CLIPDataConfig(world="scene32", hard_negatives=True),
            vision=ViTConfig(patch_size=4, width=32, depth=2, heads=2, stem="conv", pool="max"),
            text=TextTransformerConfig(context_length=24, width=64, depth=2, heads=2),
            embed_dim=64,
            train=TrainConfig(steps=500, batch_size=64, lr=2e-3, warmup_steps=100, weight_decay=0.1, ema_decay=None,
                              lr_schedule="cosine", min_lr_ratio=0.1, log_every=25, checkpoint_every=250),
        ),
    ),
    Preset(
        "clip_base",
        "clip",
        "CLIP on 64x64 scenes of one to four objects, ViT-8/256: for a GPU",
        lambda: CLIPConfig(
            data=CLIPDataConfig(world="scene64", n=1_000_000),
            vision=ViTConfig(patch_size=8, width=256, depth=8, heads=8),
            text=TextTransformerConfig(context_length=48, width=256, depth=6, heads=8),
            embed_dim=256,
            train=TrainConfig(steps=30_000, batch_size=512, lr=5e-4, warmup_steps=1000, weight_decay=0.2,
                              betas=(0.9, 0.98), eps=1e-6, ema_decay=None, lr_schedule="cosine", log_every=100,
                              checkpoint_every=2000),
        ),
    ),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- run dirs


def load_config(run_dir: str | Path) -> CLIPConfig:
    return load_run_config(run_dir, CLIPConfig, "clip", "a CLIP run")


def load_model(run_dir: str | Path, *, device: str = "cpu") -> tuple[CLIP, CLIPConfig]:
    """The trained CLIP of a run (its newest good checkpoint) and its config, in eval mode."""
    cfg = load_config(run_dir)
    model = load_latest_weights(run_dir, CLIP(cfg))
    return model.to(device).eval(), cfg


class ImageTextEncoder:
    """A trained CLIP and its tokenizer behind the two calls evaluation needs: ``embed_images`` and
    ``embed_texts`` (batched, no gradients, unit-length rows). :mod:`difflab.models.hf_clip` offers the
    same two calls around a pretrained ``transformers`` CLIP."""

    def __init__(self, model: CLIP, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.scale().detach())

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        chunks = [
            self.model.encode_image(images[i : i + self.batch_size].to(self.device))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenizer.encode(list(texts[i : i + self.batch_size]))
            out.append(self.model.encode_text(ids.to(self.device), mask.to(self.device)))
        return torch.cat(out).cpu()


def load_encoder(run_dir: str | Path, *, device: str = "cpu") -> tuple[ImageTextEncoder, CLIPConfig]:
    model, cfg = load_model(run_dir, device=device)
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    return ImageTextEncoder(model, tokenizer), cfg


# ------------------------------------------------------------------------------------------- training


def train(cfg: CLIPConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train CLIP into ``run_dir`` (config.json, tokenizer.json, checkpoints/, metrics.jsonl)."""
    cfg = resolve(cfg)
    with claim_run_dir(run_dir, cfg, resume, load_config) as run_dir:
        tokenizer = make_tokenizer(cfg)
        if is_main_process():
            tokenizer.save(run_dir / "tokenizer.json")
        torch.manual_seed(cfg.train.seed)  # the initial weights
        model = CLIP(cfg)
        loader = make_loader(captioned_scenes(cfg.data, tokenizer), cfg.train)
        model_config = {"vision": to_dict(cfg.vision), "text": to_dict(cfg.text), "embed_dim": cfg.embed_dim}
        trainer = Trainer(model, make_loss_fn(), loader, cfg.train, run_dir, model_config=model_config)
        trainer.fit(resume=resume)
    return run_dir


def info_network(cfg: CLIPConfig):
    """CLIP with an example batch of images and captions, its loss the InfoNCE loss (``difflab info``)."""
    b, v, t = cfg.train.batch_size, cfg.vision, cfg.text
    ids = torch.randint(0, t.vocab_size, (b, t.context_length))
    inputs = {"images": torch.randn(b, v.in_channels, v.image_size, v.image_size), "ids": ids,
              "mask": torch.ones_like(ids, dtype=torch.bool)}  # fmt: skip
    return CLIP(cfg), inputs, lambda out: clip_loss(*out)


def evaluate(run_dir: str | Path, n: int, *, seed: int = 0, plot: str | None = None) -> dict:
    """Zero-shot accuracy, retrieval, CLIP score and binding on held-out scenes (:mod:`clip_eval`)."""
    encoder, cfg = load_encoder(run_dir)
    return clip_eval.evaluate(encoder, cfg, run_dir, n, seed=seed, plot=plot)


FAMILY = Family(
    name="clip",
    what="a CLIP run",
    config=CLIPConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="tokenizer.json",
    eval_options=("plot",),
)
