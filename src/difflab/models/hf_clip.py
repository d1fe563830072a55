"""A pretrained CLIP from Hugging Face ``transformers`` behind difflab's encoder interface.

:class:`difflab.models.clip.ImageTextEncoder` wraps a CLIP trained here; :class:`HFCLIPEncoder` offers
the same calls (``embed_images``, ``embed_texts``, ``logit_scale``) around a ``transformers.CLIPModel``,
so :mod:`difflab.models.clip_eval` can score real pretrained CLIPs (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision") on the toy world with the same code:

    from difflab.models.clip_eval import zero_shot
    from difflab.world.scene import world_preset

    encoder = HFCLIPEncoder.from_pretrained("openai/clip-vit-base-patch32")
    zero_shot(encoder, world_preset("scene32"), 500)

Two things must match what the model saw in training, or its numbers mean little:

- **Pixels.** difflab images are (B, 3, H, W) in [-1, 1]; CLIP's preprocessing takes [0, 1] pixels,
  resizes the short side to the model's input size (bicubic), centre-crops a square and normalises
  each channel with the mean and standard deviation of its training images (:func:`preprocess`).
- **Where the text is read.** CLIP's text embedding is the transformer's output at the end-of-text
  token, the one position that has seen the whole text under the causal mask. See
  :meth:`HFCLIPEncoder._text_features` for how ``transformers`` finds that position and why a difflab
  tokenizer needs the wrapper to find it instead.

``transformers`` is optional (``pip install 'difflab[hf]'``): this module imports without it and only
:meth:`HFCLIPEncoder.from_pretrained` needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from difflab.errors import DifflabError
from difflab.text.tokenizer import eos_positions

if TYPE_CHECKING:
    import transformers

# The per-channel mean and std of OpenAI CLIP's training images, from OpenAI's reference preprocessing
# (github.com/openai/CLIP, clip/clip.py, ``_transform``: ``Normalize((0.48145466, ...), (0.26862954,
# ...))``); the ``preprocessor_config.json`` of the openai/clip-* checkpoints on the Hugging Face Hub
# lists the same numbers. OpenCLIP's LAION-trained CLIPs reuse them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """difflab images (B, 3, H, W) in [-1, 1] -> CLIP's ``pixel_values`` (B, 3, size, size).

    As OpenAI's ``_transform``: bicubic resize of the short side to ``size`` (antialiased, as PIL's
    resize is when it shrinks), centre crop to ``size`` x ``size``, normalise with :data:`CLIP_MEAN`
    and :data:`CLIP_STD`. An image already ``size`` x ``size`` is not resampled at all."""
    x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
    h, w = x.shape[-2:]
    if min(h, w) != size:
        # The long side keeps the aspect ratio, rounded down as torchvision's Resize does.
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        # Bicubic weights are partly negative, so it overshoots at sharp edges (the toy world is all
        # sharp edges); PIL works on 8-bit pixels and clips, so clip here too.
        x = x.clamp(0, 1)
        h, w = new_h, new_w
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _pooled(output) -> torch.Tensor:
    """The projected features of ``get_image_features`` / ``get_text_features``.

    transformers 4.x returns the (B, E) tensor; 5.x returns a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds it (and whose ``last_hidden_state`` is the tower's unprojected output)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFCLIPEncoder:
    """A ``transformers.CLIPModel`` and a tokenizer behind difflab's two evaluation calls.

    ``tokenizer`` is either

    - a Hugging Face tokenizer (e.g. ``CLIPTokenizer``): recognised by being callable. It is called
      with padding and truncation to the model's ``max_position_embeddings`` (77 for OpenAI's CLIPs),
      or
    - a difflab tokenizer (:class:`difflab.text.tokenizer.WordTokenizer`, ``BPETokenizer``): not
      callable, with ``encode(texts) -> (ids, mask)``. Its ids must fit the model's vocabulary and its
      rows the model's positions, so in practice this is for a ``CLIPModel`` built (or trained) on
      difflab's vocabulary, as the tests do.

    The test is for callability first because Hugging Face tokenizers also have an ``encode`` method
    (one text -> a list of ids), which is not difflab's.

    Everything runs in eval mode without gradients, ``batch_size`` items at a time on ``device``; the
    embeddings come back on the CPU in float32 with unit-length rows.
    """

    def __init__(self, model: transformers.CLIPModel, tokenizer, *, batch_size: int = 64, device="cpu"):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DifflabError(f"batch_size {batch_size!r} is invalid; expected a positive integer")
        text_cfg = model.config.text_config
        self.context_length = text_cfg.max_position_embeddings
        self.is_hf_tokenizer = callable(tokenizer)
        if not self.is_hf_tokenizer:
            if not hasattr(tokenizer, "encode"):
                raise DifflabError(
                    f"tokenizer is a {type(tokenizer).__name__}; expected a Hugging Face tokenizer or a "
                    "difflab tokenizer (with encode(texts) -> (ids, mask))"
                )
            if tokenizer.vocab_size > text_cfg.vocab_size:
                raise DifflabError(
                    f"tokenizer has {tokenizer.vocab_size} ids but the model's text vocabulary has "
                    f"{text_cfg.vocab_size}; expected a tokenizer the model was built for"
                )
            if tokenizer.context_length > self.context_length:
                raise DifflabError(
                    f"tokenizer context_length {tokenizer.context_length} exceeds the model's "
                    f"max_position_embeddings {self.context_length}; expected at most that many columns"
                )
        self.model = model.to(device).eval()
        self.tokenizer, self.batch_size, self.device = tokenizer, batch_size, torch.device(device)
        self.image_size = model.config.vision_config.image_size
        self.embed_dim = model.config.projection_dim
        self._dtype = next(model.parameters()).dtype  # a half-precision model gets half-precision pixels

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kw) -> HFCLIPEncoder:
        """A CLIP and its tokenizer from the Hugging Face Hub (e.g. ``"openai/clip-vit-base-patch32"``)
        or a local directory saved with ``save_pretrained``; ``kw`` go to the constructor
        (``batch_size``, ``device``)."""
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError:
            raise DifflabError(
                f"loading the pretrained CLIP '{name_or_path}' needs the 'transformers' package: "
                "pip install 'difflab[hf]'"
            ) from None
        model = CLIPModel.from_pretrained(name_or_path)
        return cls(model, AutoTokenizer.from_pretrained(name_or_path), **kw)

    @property
    def logit_scale(self) -> float:
        """exp(t), the learned inverse temperature (100 for OpenAI's CLIPs, the cap of Sec. 2.5)."""
        return float(self.model.logit_scale.detach().exp())

    # ------------------------------------------------------------------------------------------ images

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], any H and W -> (B, E) unit-length rows, on the CPU."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DifflabError(f"images must be a (batch, 3, height, width) tensor in [-1, 1]; got {shape}")
        out = [torch.empty(0, self.embed_dim)]
        for i in range(0, len(images), self.batch_size):
            pixels = preprocess(images[i : i + self.batch_size].to(self.device), self.image_size)
            output = self.model.get_image_features(pixel_values=pixels.to(self._dtype), return_dict=True)
            features = _pooled(output)
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------- texts

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask (B, L) of one batch: <bos>, tokens, <eos>, padding (mask 0)."""
        if self.is_hf_tokenizer:
            # Padding to the longest text rather than to 77 columns: under the causal mask the output at
            # <eos> never sees the padding after it, so it is the same, for a fraction of the work.
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
            )
            return enc["input_ids"], enc["attention_mask"]
        return self.tokenizer.encode(texts)

    def _text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) text features (B, E), read at each row's <eos>.

        <eos> is the last attended column in both tokenizers' layouts. ``transformers`` (read in 5.24's
        ``CLIPTextTransformer.forward``) does not look at the mask to find it: when the config's
        ``eos_token_id`` is 2 - the value in OpenAI's original configs, which is not their real <eos> id
        - it takes ``argmax`` of the ids, as OpenAI's code does, because CLIP's <eos> (49407) is the
        largest id of its vocabulary; otherwise it takes the first occurrence of ``eos_token_id``.

        A difflab WordTokenizer breaks the first rule: its <eos> *is* id 2, so a model built on its
        vocabulary has ``eos_token_id == 2``, but 2 is not its largest id, and ``argmax`` would read
        the output at the text's highest-numbered word. So when the ids are not ones ``transformers``
        pools correctly, the wrapper reads the last hidden state at <eos> itself and applies the text
        projection, which is exactly what ``get_text_features`` does at the right position."""
        eos = eos_positions(mask)
        eos_token_id = self.model.config.text_config.eos_token_id
        rows = torch.arange(len(ids), device=ids.device)
        if eos_token_id == 2:
            hf_pools_at_eos = bool((ids.argmax(dim=1) == eos).all())
        else:
            hf_pools_at_eos = bool((ids[rows, eos] == eos_token_id).all()) and bool(
                ((ids == eos_token_id).int().argmax(dim=1) == eos).all()
            )
        if hf_pools_at_eos:
            return _pooled(self.model.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True))
        hidden = self.model.text_model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        return self.model.text_projection(hidden[rows, eos])

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (B, E) unit-length rows, on the CPU."""
        if isinstance(texts, str):
            raise DifflabError(f"texts {texts[:40]!r} is one string; expected a list of strings")
        texts = list(texts)
        out = [torch.empty(0, self.embed_dim)]
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self._tokenize(texts[i : i + self.batch_size])
            # HF attention masks are 0/1 integers; a difflab mask is bool. Both mean "attend here".
            features = self._text_features(ids.to(self.device), mask.to(self.device).long())
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)
