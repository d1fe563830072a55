"""The vision-language family (models/vlm.py, models/vlm_network.py): the designs build and fuse as their
papers say, decoding is the model's own argmax, frozen parts stay frozen, and a tiny LLaVA learns to read
colours from the image."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from difflab.config import apply_overrides
from difflab.errors import DifflabError
from difflab.models import vlm, vlm_loss
from difflab.models.registry import get_preset
from difflab.models.vlm_network import IGNORE, encode_conversations, labels_for, patch_features, prompt_length
from difflab.nn.gpt import GPTConfig


def _tiny(**kw) -> vlm.VLMConfig:
    return vlm.resolve(dataclasses.replace(get_preset("vlm_tiny").build(), **kw))


def _batch(cfg, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = cfg.vision_scratch.image_size
    images = torch.rand(b, 3, side, side, generator=g) * 2 - 1
    tok = vlm.make_tokenizer(cfg)
    ids, mask = tok.encode(["how many circles? 2", "what colour is the square? red", "describe the image . a red "
                            "circle"][:b])  # fmt: skip
    return images, ids, mask


def test_patch_features_of_the_last_block_are_the_vits_own_tokens():
    """Layer -1 through the final LayerNorm is what VisionTransformer.forward returns (its class token dropped):
    the features the connector reads are the encoder's, cut one block earlier at -2 (LLaVA's penultimate)."""
    from difflab.nn.vit import VisionTransformer

    cfg = _tiny()
    vit = VisionTransformer(cfg.vision_scratch)
    images, _, _ = _batch(cfg)
    _, tokens = vit(images)
    last = patch_features(vit, images, -1)
    torch.testing.assert_close(vit.norm_post(last), tokens[:, 1:], rtol=0, atol=1e-6)
    penultimate = patch_features(vit, images, -2)
    assert penultimate.shape == last.shape and not torch.allclose(penultimate, last)
    model = vlm.build_network(cfg, vit)  # keeps the blocks up to vision_layer = -2, and reads the same features
    assert len(model.vision.transformer.blocks) == cfg.vision_scratch.depth - 1
    assert torch.equal(model.features(images), penultimate)


def test_dense_layers_concatenate_earlier_blocks_along_channels():
    """The Dense Connector's sparse channel integration (Yao et al. 2024, Sec. 3.2): the features the connector
    reads are each named block's own tokens (computed one layer at a time), concatenated in order, from one
    pass; the connector's input widens to match. Blocks at or above vision_layer, and repeats, are refused."""
    from difflab.nn.vit import VisionTransformer

    cfg = _tiny(vision_layer=-1, dense_layers=(0,))
    vit = VisionTransformer(cfg.vision_scratch)
    images, ids, mask = _batch(cfg)
    single = [patch_features(vit, images, layer) for layer in (0, 1)]
    assert torch.equal(patch_features(vit, images, [0, -1]), torch.cat(single, dim=-1))
    model = vlm.build_network(cfg, vit).eval()
    assert model.feature_layers == (0, 1)
    assert torch.equal(model.features(images), torch.cat(single, dim=-1))
    with torch.no_grad():
        assert model(images, ids, mask).shape == (*ids.shape, cfg.lm_model.vocab_size)
    with pytest.raises(DifflabError, match=r"dense layer 1 is not a ViT block before vision_layer's \(block 1"):
        _tiny(vision_layer=-1, dense_layers=(1,))
    with pytest.raises(DifflabError, match="dense layer 0 is not a ViT block before vision_layer's .block 0"):
        _tiny(dense_layers=(0,))  # vision_layer -2 of two blocks is block 0: nothing comes before it
    with pytest.raises(DifflabError, match=r"dense_layers \(0, -2\) name a block twice"):
        vlm.build_network(dataclasses.replace(cfg, dense_layers=(0, -2)))


def test_flamingo_fusion_at_closed_gates_is_the_language_model_alone():
    """Flamingo Sec. 2.2: tanh(0) gates, so an untrained VLM with cross-attention fusion gives the LM's logits
    bitwise, whatever the image."""
    cfg = _tiny(fusion="cross_attention", connector="perceiver")
    model = vlm.build_network(cfg).eval()
    images, ids, mask = _batch(cfg)
    with torch.no_grad():
        fused = model(images, ids, mask)
        alone = model.lm(ids, mask=mask)
        other = model(torch.zeros_like(images), ids, mask)
    assert torch.equal(fused, alone) and torch.equal(other, alone)


def test_autoregressive_fusion_reads_the_image_and_keeps_text_positions():
    cfg = _tiny()
    model = vlm.build_network(cfg).eval()
    images, ids, mask = _batch(cfg)
    with torch.no_grad():
        a = model(images, ids, mask)
        b = model(torch.zeros_like(images), ids, mask)
    assert a.shape == (3, cfg.text_length, cfg.lm_model.vocab_size)
    assert not torch.allclose(a, b)  # the visual tokens are in the sequence


@pytest.mark.parametrize("connector,fusion,instruct", [("linear", "autoregressive", False),
                                                        ("perceiver", "cross_attention", False),
                                                        ("qformer", "autoregressive", True)])  # fmt: skip
def test_every_design_trains_a_step_and_decodes(connector, fusion, instruct):
    cfg = _tiny(connector=connector, fusion=fusion, instruct=instruct)
    model = vlm.build_network(cfg)
    images, ids, mask = _batch(cfg)
    labels = labels_for(ids, mask, [prompt_length("how many circles?"), prompt_length("what colour is the square?"),
                                    prompt_length("describe the image .")])  # fmt: skip
    tok = vlm.make_tokenizer(cfg)
    instruction = vlm_loss.instruction_ids(tok, ["how many circles?"] * 3, "cpu") if instruct else None
    loss = model.loss(images, ids, mask, labels, instruction)
    loss.backward()
    assert torch.isfinite(loss)
    assert vlm.answer(model.eval(), cfg, images, ["how many circles?"] * 3)  # runs, any words


def test_labels_cover_the_target_and_eos_only():
    cfg = _tiny()
    tok = vlm.make_tokenizer(cfg)
    ids, mask = tok.encode(["how many circles? 2"])
    labels = labels_for(ids, mask, [prompt_length("how many circles?")])
    kept = labels[labels != IGNORE].tolist()
    assert kept == [tok.encode(["2"])[0][0, 1].item(), tok.eos_id]


def test_a_one_turn_row_is_the_encoded_text_and_a_conversation_labels_every_answer():
    """One turn: the tokenizer's own row and labels_for's labels, cut at the batch's longest row. A
    conversation (LLaVA's multi-turn data): the turns' rows joined after one <bos>, labels exactly each answer
    and its <eos>, in order."""
    tok = vlm.make_tokenizer(_tiny())
    turns = [("how many circles?", "2"), ("describe the image .", "a red circle at the top left"),
             ("is there a blue square?", "no")]  # fmt: skip
    ids, mask, labels = encode_conversations(tok, [[t] for t in turns])
    ref_ids, ref_mask = tok.encode([f"{p} {a}" for p, a in turns])
    ref_labels = labels_for(ref_ids, ref_mask, [prompt_length(p) for p, _ in turns])
    width = int(ref_mask.sum(1).max())
    assert ids.shape == (3, width)
    assert torch.equal(ids, ref_ids[:, :width]) and torch.equal(mask, ref_mask[:, :width])
    assert torch.equal(labels, ref_labels[:, :width])

    def words(text):  # the text's ids between <bos> and <eos>
        ids, mask = tok.encode(text)
        return ids[0, 1 : int(mask.sum()) - 1].tolist()

    ids, mask, labels = encode_conversations(tok, [turns, turns[:1]])
    joined = [tok.bos_id] + [t for p, a in turns for t in [*words(f"{p} {a}"), tok.eos_id]]
    assert ids[0].tolist() == joined and int(mask[0].sum()) == len(joined)
    assert tok.decode(ids[0]) == "how many circles? 2 describe the image. a red circle at the top left is there a " \
                                 "blue square? no"  # fmt: skip
    kept = labels[0][labels[0] != IGNORE].tolist()
    assert kept == [t for _, a in turns for t in [*words(a), tok.eos_id]]
    n = int(mask[1].sum())
    assert ids[1, n:].eq(tok.pad_id).all() and labels[1, n:].eq(IGNORE).all()


def test_visual_positions_add_one_learned_vector_per_visual_token():
    """With the table at zero the model is the plain design's, weight for weight; a non-zero table moves
    visual token k by row k alone, for every image alike."""
    cfg = _tiny(visual_positions=True)
    torch.manual_seed(0)
    model = vlm.build_network(cfg).eval()
    plain = vlm.build_network(_tiny()).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "visual_pos"})
    images, ids, mask = _batch(cfg)
    assert model.visual_pos.shape == (cfg.visual_tokens, cfg.lm_model.width)
    with torch.no_grad():
        assert torch.equal(model.visual(images), plain.visual(images) + model.visual_pos)
        model.visual_pos.zero_()
        assert torch.equal(model(images, ids, mask), plain(images, ids, mask))


def test_a_run_trains_on_conversations(tmp_path, single_thread):
    """data.turns=2 end to end: the loader's collate keeps each item's turns, the loss reads them, and the run
    answers single questions as every run does."""
    cfg = apply_overrides(get_preset("vlm_tiny").build(), ["data.turns=2", "lm_model.context_length=52",
                                                           "train.steps=3"])  # fmt: skip
    run = vlm.train(cfg, tmp_path / "talk")
    model, cfg = vlm.load_model(run)
    side = cfg.vision_scratch.image_size
    assert len(vlm.answer(model, cfg, torch.zeros(2, 3, side, side), ["how many circles?"] * 2)) == 2


def test_batched_greedy_decoding_is_each_rows_own_argmax():
    """Rows of different prompt lengths, right-padded, decode exactly as each row alone, one full forward
    pass per token (an independent, uncached reading of the same model)."""
    cfg = _tiny()
    torch.manual_seed(1)
    model = vlm.build_network(cfg).eval()
    tok = vlm.make_tokenizer(cfg)
    images, _, _ = _batch(cfg)
    prompts = ["how many circles?", "is there a red square?", "describe the image ."]
    batched = vlm.answer(model, cfg, images, prompts)
    for i, p in enumerate(prompts):
        ids = tok.encode([p])[0][0, : prompt_length(p)].tolist()
        new = []
        for _ in range(cfg.max_new_tokens):
            x = torch.tensor([ids + new])
            with torch.no_grad():
                logits = model(images[i : i + 1], x, torch.ones_like(x, dtype=torch.bool))
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_id or len(ids) + len(new) >= cfg.text_length:
                break
            new.append(nxt)
        assert batched[i] == tok.decode(new), p


def test_lm_modes_freeze_what_they_say(tmp_path, single_thread):
    """lm_mode 'frozen' trains the connector only; 'lora' the adapters too; a CLIP run's ViT never trains.
    (Parents here: an lm_tiny run; the ViT is frozen by construction when vision is a CLIP run.)"""
    from difflab.models import lm

    lm_run = lm.train(apply_overrides(get_preset("lm_tiny").build(), ["train.steps=2"]), tmp_path / "lm")
    base = apply_overrides(get_preset("vlm_tiny").build(), [f"lm={lm_run}", "train.steps=2"])
    for mode in ("frozen", "lora"):
        cfg = vlm.resolve(dataclasses.replace(base, lm_mode=mode))
        model = vlm._initial_network(cfg)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert not any(n.startswith("lm.") and "lora" not in n for n in trainable), mode
        assert any(n.startswith("connector.") for n in trainable)
        assert any("lora" in n for n in trainable) == (mode == "lora")
    pre, _ = lm.load_model(lm_run)
    model = vlm._initial_network(vlm.resolve(dataclasses.replace(base, lm_mode="frozen")))
    assert torch.equal(model.lm.wte.weight, pre.wte.weight)  # the pretrained LM was loaded


def test_bad_configs_are_named():
    with pytest.raises(DifflabError, match="unknown connector 'resampler'"):
        dataclasses.replace(get_preset("vlm_tiny").build(), connector="resampler")
    with pytest.raises(DifflabError, match="instruct=true feeds the question to a Q-Former"):
        dataclasses.replace(get_preset("vlm_tiny").build(), instruct=True)
    with pytest.raises(DifflabError, match="lm_mode 'lora' keeps an LM trained from scratch untrained"):
        _tiny(lm_mode="lora")
    with pytest.raises(DifflabError, match="objective 'qformer' trains a Q-Former on captions with the LM frozen"):
        dataclasses.replace(get_preset("vlm_tiny").build(), objective="qformer")
    with pytest.raises(DifflabError, match="context_length 16 is too short for 4 visual tokens and 24 text"):
        _tiny(lm_model=GPTConfig(context_length=16, width=32, depth=2, heads=2))
    tiny = get_preset("vlm_tiny").build()
    with pytest.raises(DifflabError, match="context_length 32 is too short for 4 visual tokens and 48 text tokens "
                                           r"\(2 turn\(s\) of text_length 24\)"):  # fmt: skip
        vlm.resolve(dataclasses.replace(tiny, data=dataclasses.replace(tiny.data, turns=2)))
    with pytest.raises(DifflabError, match="data.turns 2: a Q-Former reads one text per image"):
        dataclasses.replace(tiny, connector="qformer", instruct=True, data=dataclasses.replace(tiny.data, turns=2))
    with pytest.raises(DifflabError, match="vision_layer 5 is outside the ViT's 2 blocks"):
        _tiny(vision_layer=5)


def test_cli_refuses_other_runs_and_needs_one_input(tiny_vlm, tiny_t2i_base, capsys):
    from difflab.cli import main

    assert main(["ask", str(tiny_t2i_base), "--examples", "2"]) == 2
    assert "is a t2i run; difflab ask takes a vision-language run" in capsys.readouterr().err
    assert main(["caption", str(tiny_vlm)]) == 2
    assert "give --image FILE or --examples N" in capsys.readouterr().err
    assert main(["ask", str(tiny_vlm), "--examples", "3", "--json"]) == 0
    assert capsys.readouterr().out.count('"truth"') == 3


def test_cli_answers_and_captions_an_image_file(tiny_vlm, tmp_path, capsys):
    """--image: the file of a world scene gives the answer and caption vlm.answer/vlm.caption give that scene."""
    import json

    from difflab.cli import main
    from difflab.models.inversion import read_image

    image = tmp_path / "scene.png"
    assert main(["world", "condition", "--preset", "tiny", "--field", "image", "--out", str(image)]) == 0
    capsys.readouterr()
    model, cfg = vlm.load_model(tiny_vlm)
    pixels = read_image(image, 16)
    assert main(["ask", str(tiny_vlm), "how many circles?", "--image", str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == vlm.answer(model, cfg, pixels, ["how many circles?"])[0]
    assert main(["caption", str(tiny_vlm), "--image", str(image)]) == 0
    assert capsys.readouterr().out.strip() == vlm.caption(model, cfg, pixels)[0]


def test_a_tiny_llava_reads_colours_from_the_image(tiny_vlm):
    """The issue's learning test: colour questions on held-out scenes of the tiny world (two colours, so
    chance is 0.5 and a model that ignores the image cannot beat it) answered far above chance."""
    report = vlm.evaluate(tiny_vlm, 100)
    colour = report["vqa"]["kinds"]["color"]
    assert colour["n"] == 20
    assert colour["accuracy"] >= 0.85, report["vqa"]


def test_a_clip_run_is_the_frozen_vision_encoder(tmp_path, single_thread):
    """vision=CLIP_RUN: the record takes the CLIP's ViT config and checkpoint, the network starts from its
    weights (up to vision_layer), and a training step leaves them untouched; another world's CLIP is refused."""
    from difflab.models import clip

    clip_run = clip.train(apply_overrides(get_preset("clip_tiny").build(), ["train.steps=2"]), tmp_path / "clip")
    cfg = vlm.resolve(apply_overrides(get_preset("vlm_tiny").build(), [f"vision={clip_run}", "train.steps=2"]))
    encoder, clip_cfg = clip.load_model(clip_run)
    assert cfg.vision_scratch == clip_cfg.vision and cfg.vision_checkpoint.startswith("step_0000002")
    run = vlm.train(dataclasses.replace(cfg, vision=str(clip_run)), tmp_path / "vlm")
    model, _ = vlm.load_model(run)
    kept = encoder.visual.state_dict()
    for name, value in model.vision.state_dict().items():
        assert torch.equal(value, kept[name]), name  # frozen through training
    assert not any(p.requires_grad for p in vlm._initial_network(cfg).vision.parameters())
    with pytest.raises(DifflabError, match="sees 16px images; the 'scene32' world draws 32px ones"):
        vlm.resolve(apply_overrides(get_preset("vlm_llava").build(), [f"vision={clip_run}"]))


def test_loss_averages_over_tokens_or_over_examples():
    """'token' is cross-entropy's own mean over every labelled token; 'example' the mean of each row's mean."""
    import torch.nn.functional as F

    cfg = _tiny()
    model = vlm.build_network(cfg).eval()
    images, ids, mask = _batch(cfg)
    prompts = ["how many circles?", "what colour is the square?", "describe the image ."]
    labels = labels_for(ids, mask, [prompt_length(p) for p in prompts])
    with torch.no_grad():
        logits = model(images, ids, mask)
        token = model.loss(images, ids, mask, labels)
        example = model.loss(images, ids, mask, labels, average="example")
    flat = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    rows = [F.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=IGNORE) for i in range(3)]
    torch.testing.assert_close(token, flat)
    torch.testing.assert_close(example, torch.stack(rows).mean())
    assert not torch.allclose(token, example)  # the caption row has more labelled tokens than the answers
