"""Attention supervision (TokenCompose, Wang et al. 2024): which tokens name which objects, the targets,
the two grounding terms, recording cross-attention with gradients, the supervised training loss, and a
tiny UNet that learns to look at its objects. Sources: the prompt's own structure (a spec's words, the
objects it matches), ``ground``, closed forms (a map on its mask gives 0), the recipe's own loss, and a
learning property (the share of attention inside the mask rises from chance)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from difflab.data.captioned import T2I_CAPTIONS, Caption, CaptionedScenes
from difflab.errors import DifflabError
from difflab.models.attention_supervision import (
    CrossAttentionProbs,
    WithAttentionTargets,
    _KeptCaptions,
    grounding_loss,
    make_supervised_loss_fn,
    object_masks,
    phrase_tokens,
    supervision_fields,
)
from difflab.models.codecs import Pixels
from difflab.models.conditioners import TextPrompts
from difflab.models.recipe import DiffusionConfig, make_loss_fn
from difflab.models.text_encoder import FrozenTextEncoder
from difflab.nn.attention import SpatialAttention
from difflab.nn.text_transformer import TextTransformerConfig
from difflab.nn.unet import UNet, UNetConfig
from difflab.text.tokenizer import WordTokenizer
from difflab.world.grounding import ground
from difflab.world.language import caption, short_caption
from difflab.world.prompts import Conjunction, Count, Exists, ObjectSpec, Relation, matches, mentioned, plural
from difflab.world.render import render
from difflab.world.scene import scene_at, world_preset

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_UNET = UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), heads=2,
                       norm_groups=4, context_dim=32, image_size=16, in_channels=3, out_channels=3)  # fmt: skip


def _object_words(spec: ObjectSpec, plural_form: bool) -> list[str]:
    """What a mention's supervised tokens must read, from the spec itself: size, colour, noun."""
    noun = spec.shape or "object"
    return [w for w in (spec.size, spec.color) if w] + [plural(noun) if plural_form else noun]


# ------------------------------------------------------------------------------------- token positions


@pytest.mark.parametrize(
    "prompt, positions",
    [
        (Exists(ObjectSpec("circle", "red", "large", "top left")), [[2, 3, 4]]),  # a large red circle at ...
        (Count(ObjectSpec("cross", "red"), 2), [[2, 3]]),  # two red crosses
        (Relation(ObjectSpec("circle"), "left_of", ObjectSpec("square", "blue")), [[2], [8, 9]]),
        (Conjunction((ObjectSpec("circle"), ObjectSpec("circle"))), [[2], [5]]),  # a circle and a circle
        (
            Conjunction((ObjectSpec("circle", "red"), ObjectSpec("square"), ObjectSpec("cross"))),
            [[2, 3], [6], [9]],
        ),
        (Exists(ObjectSpec(color="orange", position="center")), [[2, 3]]),  # an orange object in the center
        (Conjunction(()), []),  # an empty scene
    ],
)
def test_phrase_tokens_on_written_out_prompts(prompt, positions):
    """Positions counted by hand in the text ('a circle and a circle': each circle its own word)."""
    assert phrase_tokens(prompt, WordTokenizer.for_world(), 32) == positions


def test_phrase_tokens_needs_one_token_per_word_and_the_layout_length():
    prompt = Exists(ObjectSpec("circle"))
    with pytest.raises(DifflabError, match="expected length 40"):
        phrase_tokens(prompt, WordTokenizer.for_world(), 40)

    class TwoPerWord:  # a subword tokenizer's layout: more tokens than words
        def encode(self, text):
            n = 2 * len(text.split()) + 2
            return torch.ones(1, 32, dtype=torch.long), torch.arange(32)[None] < n

    with pytest.raises(DifflabError, match="word-level tokenizer"):
        phrase_tokens(prompt, TwoPerWord(), 32)


@pytest.mark.parametrize("preset", ["scene32", "scene64"])
def test_tokens_and_targets_align_with_ground_on_random_captions(preset):
    """For random scenes and every captioner (full and short forms), each mention's tokens decode to
    exactly its size/colour/noun words, and its target slot holds exactly the objects ``ground`` names -
    each of which matches the mention's spec, all n of a count."""
    world = world_preset(preset)
    tok = WordTokenizer.for_world(context_length=40)
    rng = np.random.default_rng(0)
    kinds = set()
    for i in range(40):
        scene = scene_at(world, 3, i)
        full = render(scene, world).mask
        for make in (caption, short_caption):
            text, prompt = make(scene, rng)
            kinds.add(type(prompt).__name__)
            ids = tok.encode(text)[0][0]
            positions = phrase_tokens(prompt, tok, 40)
            groups = ground(prompt, scene)
            assert len(positions) == len(groups) == len(mentioned(prompt))
            fields = supervision_fields(prompt, scene, world, tok, 40, world.resolution, world.max_objects)
            index, targets = fields["token_mask_index"], fields["target_masks"]
            assert index.shape == (40,) and targets.shape == (
                world.max_objects,
                world.resolution,
                world.resolution,
            )
            plural_form = isinstance(prompt, Count) and prompt.n != 1
            for m, (tokens, spec, objects) in enumerate(
                zip(positions, mentioned(prompt), groups, strict=True)
            ):
                assert tok.decode(ids[tokens]) == " ".join(_object_words(spec, plural_form)), text
                assert (index == m + 1).nonzero().flatten().tolist() == tokens
                # at the full resolution a target is a union of whole instance masks: which objects?
                inside = {k for k in range(len(scene.objects)) if (full == k + 1).any()
                          and bool((targets[m].numpy()[full == k + 1] == 1).all())}  # fmt: skip
                assert inside == {k for k in objects if (full == k + 1).any()}
                assert all(matches(spec, scene.objects[k]) for k in objects)
                if isinstance(prompt, Count):
                    assert len(objects) == prompt.n
                assert set(np.unique(targets[m].numpy())) <= {0.0, 1.0}
            assert int((index > 0).sum()) == sum(map(len, positions))
            assert not targets[len(groups) :].any()
    assert kinds == {"Exists", "Count", "Relation", "Conjunction"}


def test_object_masks_are_area_downsampled_instance_masks():
    world = world_preset("scene32")
    scene = scene_at(world, 0, 5)
    mask = render(scene, world).mask
    full = object_masks(scene, world, 32)
    assert torch.equal(
        full, torch.from_numpy(np.stack([mask == k + 1 for k in range(len(scene.objects))])).float()
    )
    for side in (16, 8):
        small = object_masks(scene, world, side)
        assert small.shape == (len(scene.objects), side, side)
        assert 0 <= small.min() and small.max() <= 1
        torch.testing.assert_close(small.sum((1, 2)) * (32 // side) ** 2, full.sum((1, 2)))  # area kept
    with pytest.raises(DifflabError, match="divisor"):
        object_masks(scene, world, 12)


def _captioner(scene, rng):
    return Caption(*caption(scene, rng))


def test_with_attention_targets_adds_the_fields_and_keeps_the_rest():
    world = world_preset("scene32")
    tok = WordTokenizer.for_world()
    data = CaptionedScenes(world, 6, 0, _captioner, stream=T2I_CAPTIONS, tokenizer=tok)
    wrapped = WithAttentionTargets(data, side=16)
    assert len(wrapped) == len(data)
    for i in range(len(data)):
        item, base = wrapped[i], data[i]
        assert set(item) == set(base) | {"token_mask_index", "target_masks"}
        assert all(torch.equal(item[k], base[k]) for k in base)
        assert item["target_masks"].shape == (2, 16, 16) and item["token_mask_index"].shape == (32,)
        words = tok.decode(item["ids"][item["token_mask_index"] > 0])
        assert words and words.split()[-1] in {w for s in ("circle", "square", "triangle", "diamond", "cross")
                                               for w in (s, plural(s))}  # fmt: skip


# ------------------------------------------------------------------------------------------------ loss


def _boxes(b: int, m: int, side: int) -> torch.Tensor:
    """Disjoint rectangular masks (B, M, side, side): object m of item i in its own band of rows."""
    masks = torch.zeros(b, m, side, side)
    for i in range(b):
        for k in range(m):
            masks[i, k, 4 * k : 4 * k + 2 + i, 1 + k : 5 + k] = 1.0
    return masks


def test_grounding_loss_is_zero_on_the_mask_positive_elsewhere_and_differentiable():
    """L_token = 0 when each token's attention lies in its mask (any multiple of it); the whole loss = 0
    when each phrase's attention equals the binary mask; random attention gives > 0 and a gradient."""
    b, side, length = 2, 8, 6
    masks = _boxes(b, 2, side)
    index = torch.tensor([[0, 1, 1, 2, 0, 0], [0, 2, 0, 1, 1, 0]])  # mention 1: two tokens, mention 2: one
    flat = masks.flatten(2)  # (B, M, N)

    # (a) inside only, any scale: 0.3 of each in-mask pixel to each of the mention's tokens, the rest to <bos>
    probs = torch.zeros(b, side * side, length)
    for i in range(b):
        for j in range(length):
            if index[i, j]:
                probs[i, :, j] = 0.3 * flat[i, index[i, j] - 1]
    probs[..., 0] = 1 - probs.sum(-1)
    assert grounding_loss(probs, index, masks, pixel_weight=0.0) == 0.0
    assert grounding_loss(probs, index, masks) > 0.0  # the phrase takes 0.6, not all, of its pixels

    # (b) each phrase's map equals its mask: both terms vanish
    probs = torch.zeros(b, side * side, length)
    for i in range(b):
        for j in range(length):
            if index[i, j]:  # the mention's tokens share each of its pixels: 1/2 + 1/2, or 1
                probs[i, :, j] = flat[i, index[i, j] - 1] / int((index[i] == index[i, j]).sum())
    probs[..., 0] = 1 - probs.sum(-1)
    assert grounding_loss(probs, index, masks) == 0.0
    # targets stored at a finer side are area-resized to the attention's: the same loss
    fine = masks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert grounding_loss(probs, index, fine) == 0.0

    logits = torch.randn(b, side * side, length, requires_grad=True)
    loss = grounding_loss(logits.softmax(-1), index, masks)
    assert loss > 0.1
    loss.backward()
    assert logits.grad.abs().sum() > 0
    # nothing supervised: zero, and still differentiable
    empty = grounding_loss(logits.softmax(-1), torch.zeros_like(index), masks)
    assert empty == 0.0 and empty.requires_grad


# --------------------------------------------------------------------------------------- recording probs


def test_recording_captures_each_cross_attention_layer_with_grad_and_restores_hooks():
    torch.manual_seed(0)
    unet = UNet(TINY_UNET)
    cross = [m.cross_attn for m in unet.modules() if isinstance(m, SpatialAttention)]
    assert len(cross) == 4  # down at 8, middle, two up blocks at 8
    sentinel = lambda p: None  # noqa: E731 - a hook set before recording must come back
    cross[1].probs_hook = sentinel
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    ctx, mask = torch.randn(2, 7, 32), torch.tensor([[True] * 5 + [False] * 2] * 2)
    recorder = CrossAttentionProbs()
    with recorder.recording(unet):
        unet(x, t, context=ctx, context_mask=mask)
    assert len(recorder.records) == len(cross)
    for r in recorder.records:
        assert r.side == 8 and r.probs.shape == (2, 64, 7) and r.probs.requires_grad
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(2, 64))
        assert r.probs[..., 5:].abs().max() == 0  # padding gets nothing
    assert [m.probs_hook for m in cross] == [None, sentinel, None, None]
    mid_up = CrossAttentionProbs("mid_up")
    with mid_up.recording(unet):
        unet(x, t, context=ctx, context_mask=mask)
    assert [r.name.split(".")[0] for r in mid_up.records] == ["mid_attn", "up", "up"]


# ----------------------------------------------------------------------------------- supervised loss


def _parts(cond_drop: float):
    """Eight captioned items of the tiny world (its objects shrunk, see below) with targets at 8, a random
    frozen text encoder, a tiny UNet."""
    # Large objects of radius 0.3 cover a third of the 8x8 grid and overlap from item to item, so that even
    # another item's mask (a mis-wired loss) teaches ~0.7 of the attention into the right one; at 0.18 the
    # right masks reach ~1.0 while rolled, transposed or mirrored ones stay under 0.45.
    world = world_preset("tiny", radius={"small": 0.12, "large": 0.18})
    tok = WordTokenizer.for_world()
    data = WithAttentionTargets(
        CaptionedScenes(world, 8, 0, _captioner, stream=T2I_CAPTIONS, tokenizer=tok), side=8
    )
    batch = default_collate([data[i] for i in range(len(data))])
    torch.manual_seed(0)
    text = TextTransformerConfig(vocab_size=tok.vocab_size, context_length=32, width=32, depth=1, heads=2)
    conditioner = TextPrompts(FrozenTextEncoder(text, 16, tok), cond_drop, pooled=False)
    cfg = SimpleNamespace(diffusion=DiffusionConfig(timesteps=100))
    return cfg, cfg.diffusion.make_schedule(), conditioner, batch, UNet(TINY_UNET)


def test_supervised_loss_is_the_recipes_plus_weighted_grounding_and_trains_q_and_k():
    cfg, schedule, conditioner, batch, unet = _parts(cond_drop=0.3)
    base_fn = make_loss_fn(cfg, schedule, conditioner, Pixels())

    def run(fn):
        return fn(unet, batch, torch.Generator().manual_seed(7))

    base, _ = run(base_fn)
    zero, _ = run(make_supervised_loss_fn(cfg, schedule, conditioner, Pixels(), weight=0.0))
    assert torch.equal(zero, base)

    loss, metrics = run(make_supervised_loss_fn(cfg, schedule, conditioner, Pixels(), weight=2.0))
    grounding = metrics["grounding"]
    assert grounding > 0 and loss > base
    torch.testing.assert_close(loss - 2.0 * grounding, base, atol=1e-5, rtol=0)  # the fused kernel's rounding
    q_k = [w for m in unet.modules() if isinstance(m, SpatialAttention) for w in (m.cross_attn.to_q.weight,
                                                                                 m.cross_attn.to_k.weight)]  # fmt: skip
    base.backward(retain_graph=True)  # conv_out starts at zero: the diffusion loss alone moves no q or k
    assert all(w.grad is None or w.grad.abs().sum() == 0 for w in q_k)
    unet.zero_grad()
    loss.backward()
    assert all(w.grad.abs().sum() > 0 for w in q_k)


def test_supervised_loss_skips_dropped_captions():
    """The captions kept are those the conditioner's own draw keeps (TextPrompts: rand < cond_drop drops);
    with every caption dropped (cond_drop near 1) nothing is supervised."""
    cfg, schedule, conditioner, batch, unet = _parts(cond_drop=0.5)
    watched = _KeptCaptions(conditioner)
    watched.for_training(batch, torch.Generator().manual_seed(3), 8, "cpu")
    drawn = torch.rand(8, generator=torch.Generator().manual_seed(3)) >= 0.5
    assert torch.equal(watched.kept, drawn) and 0 < int(drawn.sum()) < 8

    cfg, schedule, conditioner, batch, unet = _parts(cond_drop=0.999999)
    fn = make_supervised_loss_fn(cfg, schedule, conditioner, Pixels(), weight=1.0)
    _, metrics = fn(unet, batch, torch.Generator().manual_seed(0))
    assert metrics["grounding"] == 0.0
    with pytest.raises(DifflabError, match="WithAttentionTargets"):
        fn(unet, {k: v for k, v in batch.items() if k != "target_masks"}, torch.Generator())


def _inside_share(records, index, targets) -> float:
    """Mean over supervised tokens and layers of the share of a token's attention inside its mask."""
    binary = (targets > 0).flatten(2).float()  # (B, M, N); the targets are at the layers' side
    shares = []
    for r in records:
        for i, j in (index > 0).nonzero().tolist():
            a = r.probs[i, :, j].detach()
            shares.append(float((a * binary[i, index[i, j] - 1]).sum() / a.sum()))
    return float(np.mean(shares))


def test_grounding_loss_alone_teaches_a_tiny_unet_where_to_look():
    """Adam on the grounding loss alone (fixed batch, tiny UNet, t = 0) moves each supervised token's
    attention from about the mask's share of the image (~0.1) into its mask (~1.0)."""
    _, _, conditioner, batch, unet = _parts(cond_drop=0.0)
    enc = conditioner.encoder.encode_ids(batch["ids"], batch["mask"])
    x, t = batch["image"], torch.zeros(len(batch["image"]), dtype=torch.long)
    index, targets = batch["token_mask_index"], batch["target_masks"]
    recorder = CrossAttentionProbs()
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    for step in range(100):
        with recorder.recording(unet):
            unet(x, t, context=enc.tokens, context_mask=enc.mask)
        if step == 0:
            before = _inside_share(recorder.records, index, targets)
        loss = torch.stack([grounding_loss(r.probs, index, targets) for r in recorder.records]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _inside_share(recorder.records, index, targets)
    chance = float((targets > 0).float().sum((2, 3)).max(1).values.mean() / 64)  # each item's mask share
    assert before < chance + 0.15
    assert after > 0.8, (before, after)
