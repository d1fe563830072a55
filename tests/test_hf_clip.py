"""HFCLIPEncoder: a tiny random transformers CLIPModel against direct computations, both tokenizer kinds,
batching, clip_eval on top of it, and the error without transformers."""

from __future__ import annotations

import string
import sys

import pytest
import torch
import torch.nn.functional as F

# transformers is the optional extra 'hf'; the dev install has it, so these tests run in CI.
transformers = pytest.importorskip("transformers")

from difflab.errors import DifflabError  # noqa: E402
from difflab.models.clip_eval import zero_shot  # noqa: E402
from difflab.models.hf_clip import HFCLIPEncoder  # noqa: E402
from difflab.text.tokenizer import WordTokenizer  # noqa: E402
from difflab.world.scene import world_preset  # noqa: E402

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
TEXTS = ["a red circle", "two blue squares", "a small green triangle at the top left", "a circle", "red", "a"]


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer.for_world(context_length=24)


@pytest.fixture(scope="module")
def model(tok):
    text = dict(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=24,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


@pytest.fixture(scope="module")
def hf_tok():
    """A real CLIPTokenizer built offline: one token per character, no merges; like OpenAI's vocabulary,
    <|endoftext|> (also the padding) has the largest id."""
    chars = [*string.ascii_lowercase, ",", "?"]
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def image_features(model, pixels) -> torch.Tensor:
    out = model.get_image_features(pixel_values=pixels)
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def unit_rows(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(len(x)), atol=1e-5)


# ----------------------------------------------------------------------------------------------- texts


@torch.no_grad()
def test_texts_are_read_at_eos_with_a_difflab_tokenizer(model, tok):
    enc = HFCLIPEncoder(model, tok)
    got = enc.embed_texts(TEXTS)
    assert got.shape == (len(TEXTS), 16) and got.device.type == "cpu" and unit_rows(got)
    # Independently: each text alone, unpadded and without a mask, read at its last column (<eos>).
    want = []
    for t in TEXTS:
        ids, mask = tok.encode([t])
        ids = ids[:, : int(mask.sum())]
        assert ids[0, -1] == tok.eos_id
        hidden = model.text_model(input_ids=ids).last_hidden_state[:, -1]
        want.append(F.normalize(model.text_projection(hidden), dim=-1))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-6, rtol=0)
    # The reason the wrapper pools itself: the config's eos_token_id is difflab's <eos>, 2, which makes
    # transformers take argmax of the ids - the highest word id here, not <eos>.
    assert model.config.text_config.eos_token_id == 2
    ids, mask = tok.encode(TEXTS)
    hf = model.get_text_features(input_ids=ids, attention_mask=mask.long())
    hf = F.normalize(hf if isinstance(hf, torch.Tensor) else hf.pooler_output, dim=-1)
    assert not torch.allclose(hf, got, atol=1e-3)


@torch.no_grad()
def test_texts_with_a_hugging_face_tokenizer_use_get_text_features(model, hf_tok):
    enc = HFCLIPEncoder(model, hf_tok)
    assert enc.is_hf_tokenizer
    got = enc.embed_texts(TEXTS)
    inputs = hf_tok(TEXTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    out = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    want = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # Truncated to the model's 24 positions, <eos> kept last: no error, and a row like any other.
    long = enc.embed_texts(["a very long caption that has far more characters than positions"])
    assert long.shape == (1, 16) and unit_rows(long)


# ---------------------------------------------------------------------------------------------- images


@torch.no_grad()
def test_images_match_clip_preprocessing_written_out(model, tok):
    enc = HFCLIPEncoder(model, tok)
    x = images(5, 32, 32)
    got = enc.embed_images(x)
    assert got.shape == (5, 16) and got.device.type == "cpu" and unit_rows(got)
    torch.testing.assert_close(got, image_features(model, ((x + 1) / 2 - MEAN) / STD), atol=1e-6, rtol=0)

    # 16x16: resized up to the model's 32 (bicubic), nothing to crop.
    small = images(4, 16, 16, seed=1)
    up = F.interpolate((small + 1) / 2, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    got = enc.embed_images(small)
    assert got.shape == (4, 16) and unit_rows(got)
    torch.testing.assert_close(got, image_features(model, (up - MEAN) / STD), atol=1e-6, rtol=0)

    # 16x24: the short side goes to 32 (-> 32x48), then the centre 32 columns (8 to 40) are kept.
    wide = images(2, 16, 24, seed=2)
    up = F.interpolate((wide + 1) / 2, size=(32, 48), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(
        enc.embed_images(wide), image_features(model, (up[..., 8:40] - MEAN) / STD), atol=1e-6, rtol=0
    )


def test_batching_does_not_change_the_embeddings(model, tok, hf_tok):
    x = images(7, 32, 32, seed=3)
    small, big = HFCLIPEncoder(model, tok, batch_size=3), HFCLIPEncoder(model, tok, batch_size=64)
    torch.testing.assert_close(small.embed_images(x), big.embed_images(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(small.embed_texts(TEXTS), big.embed_texts(TEXTS), atol=1e-6, rtol=0)
    # A Hugging Face tokenizer pads each batch to its longest text, so batches differ in width.
    small, big = HFCLIPEncoder(model, hf_tok, batch_size=3), HFCLIPEncoder(model, hf_tok, batch_size=64)
    torch.testing.assert_close(small.embed_texts(TEXTS), big.embed_texts(TEXTS), atol=1e-6, rtol=0)
    assert big.embed_texts([]).shape == (0, 16) and big.embed_images(images(0, 32, 32)).shape == (0, 16)


# ------------------------------------------------------------------------------------- eval and loading


def test_zero_shot_runs_on_it(model, tok):
    enc = HFCLIPEncoder(model, tok)
    assert enc.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    report = zero_shot(enc, world_preset("single32"), 20)
    assert report["n"] == 20
    for key in ("color_accuracy", "shape_accuracy", "color_shape_accuracy"):
        assert 0.0 <= report[key] <= 1.0


def test_from_pretrained_loads_a_saved_directory(model, hf_tok, tmp_path):
    model.save_pretrained(tmp_path)
    hf_tok.save_pretrained(tmp_path)
    enc = HFCLIPEncoder.from_pretrained(str(tmp_path), batch_size=2)
    assert enc.batch_size == 2 and enc.is_hf_tokenizer
    direct = HFCLIPEncoder(model, hf_tok)
    x = images(3, 32, 32, seed=4)
    torch.testing.assert_close(enc.embed_images(x), direct.embed_images(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.embed_texts(TEXTS), direct.embed_texts(TEXTS), atol=1e-6, rtol=0)


def test_missing_transformers_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(DifflabError, match=r"needs the 'transformers' package: pip install 'difflab\[hf\]'"):
        HFCLIPEncoder.from_pretrained("openai/clip-vit-base-patch32")


def test_bad_inputs_are_named(model, tok):
    with pytest.raises(DifflabError, match="tokenizer is a dict"):
        HFCLIPEncoder(model, {})
    with pytest.raises(DifflabError, match="context_length 32 exceeds the model's max_position_embeddings"):
        HFCLIPEncoder(model, WordTokenizer.for_world(context_length=32))
    with pytest.raises(DifflabError, match="batch_size 0 is invalid"):
        HFCLIPEncoder(model, tok, batch_size=0)
    enc = HFCLIPEncoder(model, tok)
    with pytest.raises(DifflabError, match=r"images must be .*; got \(2, 32, 32\)"):
        enc.embed_images(torch.zeros(2, 32, 32))
    with pytest.raises(DifflabError, match="is one string"):
        enc.embed_texts("a red circle")
