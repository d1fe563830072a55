"""Grounding a VLM's attention (models/vlm_grounding.py): the targets are the named objects' rendered masks,
the supervised tokens are the questions' phrase ends and the captions' mentions, the loss is TokenCompose's
token loss in closed form, and recording the attention leaves the LM loss as it was."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from difflab.config import apply_overrides
from difflab.data.vqa import VQADataConfig, VQAScenes
from difflab.errors import DifflabError
from difflab.models import vlm, vlm_loss
from difflab.models import vlm_grounding as grounding
from difflab.models.registry import get_preset
from difflab.models.vlm_network import encode_conversations
from difflab.world.prompts import ObjectSpec, matches


def test_targets_are_the_named_objects_masks_and_the_marked_tokens_their_words():
    """Per training row: each colour, shape or position question marks its phrase end, each caption mention
    its size, colour and noun, with the mask of the object the world's answer or caption is about (the token
    under its centre covered); count and existence turns mark nothing."""
    cfg = vlm.resolve(dataclasses.replace(get_preset("vlm_llava").build(), grounding=1.0), attach=False)
    tok = vlm.make_tokenizer(cfg)
    data = VQAScenes(VQADataConfig(world="scene32", n=64, turns=4))
    items = [grounding.WithObjectMasks(data, 4, tok, cfg.text_length)[j] for j in range(24)]
    batch = grounding.collate_grounded(items)
    assert batch["ground"].shape == (24, 4 * 2, 4, 4) and batch["ground_at"].shape == (24, 8, 3)
    ids, _, labels = encode_conversations(tok, vlm_loss.conversations(batch))
    index, targets = grounding.token_mask_index(labels, batch["ground_at"]), batch["ground"]
    kinds = set()
    for row, item in enumerate(items):
        scene = data.scenes.scene(row)
        for slot in range(8):
            words = [tok.decode([int(ids[row, p])]) for p in torch.nonzero(index[row] == slot + 1).flatten()]
            turn, kind = slot // 2, item["kind"][slot // 2]
            if not words:
                assert not targets[row, slot].any()
                continue
            kinds.add(kind)
            assert kind in (*grounding.GROUNDED_KINDS, "caption")
            if kind == "caption":
                assert " ".join(words) in item["answer"][turn]
            else:
                assert slot % 2 == 0 and words == [item["question"][turn].rstrip("?").split()[-1]]
            spec = ObjectSpec(**{a: w for w in words for a in ("shape", "color", "size")
                                 if w in getattr(data.world, a + "s")})  # fmt: skip
            named = [o for o in scene.objects if matches(spec, o)]
            if len(named) == 1:  # the one object these words pick out: its centre's token is covered
                o = named[0]
                assert targets[row, slot, min(int(o.y * 4), 3), min(int(o.x * 4), 3)] > 0
    assert kinds == {*grounding.GROUNDED_KINDS, "caption"}
    questions_only = grounding.WithObjectMasks(data, 4, tok, cfg.text_length, kinds=grounding.GROUNDED_KINDS)
    for row, item in enumerate(items):
        kept = questions_only[row]["ground"]
        for slot in range(8):
            expected = 0 if item["kind"][slot // 2] == "caption" else batch["ground"][row, slot]
            assert torch.equal(kept[slot], torch.zeros_like(kept[slot]) + expected)
    with pytest.raises(DifflabError, match="row 0 has 4 answers for 6 grounding slots"):
        grounding.token_mask_index(labels[:1], batch["ground_at"][:1, :6])


def test_counts_and_existence_probes_are_grounded_on_the_objects_they_are_about():
    """A count's target is the union of the objects it counts; an existence probe's, of the objects of its
    shape, whatever their colour (the attribute-binding swap 'is there a red square?' beside a blue square is
    grounded on the square); neither has a target when there are none. Checked against the masks of a scene
    built by hand."""
    from difflab.models.attention_supervision import object_masks
    from difflab.world.scene import Obj, Scene, WorldConfig

    world = WorldConfig(resolution=32, max_objects=3)
    scene = Scene([Obj("circle", "red", "large", 0.25, 0.25), Obj("square", "blue", "large", 0.75, 0.75),
                   Obj("circle", "blue", "small", 0.75, 0.25)])  # fmt: skip
    masks = object_masks(scene, world, 4)  # (3, 4, 4)
    assert (masks.flatten(1).amax(1) > 0).all() and not (masks[0] * masks[2]).any()  # apart, each shown
    union = torch.maximum
    assert torch.equal(grounding.question_mask("how many circles?", masks, scene), union(masks[0], masks[2]))
    assert torch.equal(grounding.question_mask("how many blue objects?", masks, scene), union(masks[1], masks[2]))
    assert torch.equal(grounding.question_mask("is there a red square?", masks, scene), masks[1])
    assert torch.equal(grounding.question_mask("is there a blue circle?", masks, scene), union(masks[0], masks[2]))
    assert grounding.question_mask("how many triangles?", masks, scene) is None
    assert grounding.question_mask("is there a red diamond?", masks, scene) is None
    assert torch.equal(grounding.question_mask("what colour is the square?", masks, scene), masks[1])
    with pytest.raises(DifflabError, match="'is there a dog\\?' is not a question of the world"):
        grounding.question_mask("is there a dog?", masks, scene)
    with pytest.raises(DifflabError, match="names 2 objects"):
        grounding.question_mask("what colour is the circle?", masks, scene)


def test_the_loss_is_tokencomposes_token_loss_over_the_visual_keys():
    """One query over K = 16 visual tokens and 2 text tokens, its object on 4 visual tokens: attention
    spread evenly over the visual tokens leaves 1/4 inside, so L = (1 - 1/4)^2; all of it inside gives 0, and
    attention to the text does not count (the share is over the visual keys)."""
    k, length = 16, 3
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, :2, :2] = 0.5  # any coverage counts, as TokenCompose's binary masks
    index = torch.zeros(1, length, dtype=torch.long)
    index[0, 1] = 1  # text position 1 is the phrase end of turn 0

    def probs(visual: torch.Tensor, to_text: float) -> torch.Tensor:
        p = torch.full((1, k + length, k + length), 0.0)
        p[0, k + 1, :k] = visual / visual.sum() * (1 - to_text)
        p[0, k + 1, k : k + 2] = to_text / 2
        return p

    even = probs(torch.ones(k), 0.5)
    inside = probs(target.flatten().gt(0).float(), 0.9)
    assert grounding.visual_grounding_loss([even], k, index, target).item() == pytest.approx(0.75**2)
    assert grounding.visual_grounding_loss([inside], k, index, target).item() == pytest.approx(0.0, abs=1e-7)
    both = grounding.visual_grounding_loss([even, inside], k, index, target).item()
    assert both == pytest.approx(0.75**2 / 2)  # the mean over blocks


def test_grounded_training_keeps_the_lm_loss_and_trains(tmp_path, single_thread):
    """Recording the attention (the written-out softmax) gives the same LM loss as the fused kernel, the total is
    L_LM + grounding * L_token, and a run with grounding trains end to end and logs both terms."""
    # every patch its own visual token (4 px of the 16 px world), so that objects do not cover the whole grid
    cfg = vlm.resolve(apply_overrides(get_preset("vlm_tiny").build(), ["grounding=0.5", "visual_tokens=16",
                                                                       "lm_model.context_length=40"]))  # fmt: skip
    data = grounding.WithObjectMasks(VQAScenes(cfg.data), 4, vlm.make_tokenizer(cfg), cfg.text_length)
    batch = grounding.collate_grounded([data[j] for j in range(64)])
    torch.manual_seed(0)
    model = vlm.build_network(cfg)
    tok = vlm.make_tokenizer(cfg)
    plain = vlm_loss.make_loss_fn(dataclasses.replace(cfg, grounding=0.0), tok)(model, batch, torch.Generator())
    total, parts = vlm_loss.make_loss_fn(cfg, tok)(model, batch, torch.Generator())
    torch.testing.assert_close(parts["loss_lm"], plain.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(total.detach(), parts["loss_lm"] + 0.5 * parts["loss_ground"])
    assert 0 < parts["loss_ground"] < 1
    run = vlm.train(apply_overrides(get_preset("vlm_tiny").build(), ["grounding=0.5", "train.steps=4",
                                                                     "train.log_every=2"]), tmp_path / "g")  # fmt: skip
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_ground" in m for m in logged)


def test_grounding_needs_a_pooled_grid_in_the_lms_sequence():
    tiny = get_preset("vlm_tiny").build()
    with pytest.raises(DifflabError, match="grounding 1 supervises the LM's attention over a pooled patch grid"):
        dataclasses.replace(tiny, grounding=1.0, connector="perceiver")
    with pytest.raises(DifflabError, match="grounding"):
        dataclasses.replace(tiny, grounding=-1.0)
    with pytest.raises(DifflabError, match="unknown grounding kind 'counts'"):
        dataclasses.replace(tiny, grounding=1.0, grounding_kinds=("position", "counts"))
