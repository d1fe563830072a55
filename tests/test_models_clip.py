"""CLIP: the loss against the paper's pseudocode, the towers' masks, DDP gathering, learning, eval, export."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from difflab.cli import main
from difflab.data.toy import ToyWorldDataset
from difflab.errors import DifflabError
from difflab.models.clip import CLIP, captioned_scenes, clip_loss, make_loss_fn, make_tokenizer, resolve
from difflab.models.registry import get_preset
from difflab.nn.text_transformer import TextTransformer, TextTransformerConfig
from difflab.nn.transformer import causal_padding_mask
from difflab.nn.vit import VisionTransformer, ViTConfig


def tiny_cfg(hard_negatives: bool = False):
    cfg = resolve(get_preset("clip_tiny").build())
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, hard_negatives=hard_negatives))


# ------------------------------------------------------------------------------------------------ loss


def figure3_loss(I_f, T_f, W_i, W_t, t):
    """Radford et al. (2021), Figure 3, transcribed to numpy line by line (float64)."""

    def l2_normalize(x, axis):
        return x / np.linalg.norm(x, axis=axis, keepdims=True)

    def cross_entropy_loss(logits, labels, axis):
        # axis=0: each column is a distribution over images; axis=1: each row over texts
        top = logits.max(axis=axis, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(axis=axis, keepdims=True))  # log-softmax
        return -logp[labels, labels].mean()

    I_e = l2_normalize(np.dot(I_f, W_i), axis=1)
    T_e = l2_normalize(np.dot(T_f, W_t), axis=1)
    logits = np.dot(I_e, T_e.T) * np.exp(t)
    n = I_f.shape[0]
    labels = np.arange(n)
    loss_i = cross_entropy_loss(logits, labels, axis=0)
    loss_t = cross_entropy_loss(logits, labels, axis=1)
    return (loss_i + loss_t) / 2


@pytest.mark.parametrize("n", [1, 7, 32])
def test_clip_loss_matches_figure3_pseudocode(n):
    rng = np.random.default_rng(n)
    I_f, T_f = rng.normal(size=(n, 12)), rng.normal(size=(n, 9))
    W_i, W_t = rng.normal(size=(12, 6)), rng.normal(size=(9, 6))
    t = math.log(1 / 0.07)
    expected = figure3_loss(I_f, T_f, W_i, W_t, t)
    img = torch.nn.functional.normalize(torch.from_numpy(I_f @ W_i), dim=1)
    txt = torch.nn.functional.normalize(torch.from_numpy(T_f @ W_t), dim=1)
    got = clip_loss(img, txt, torch.tensor(math.exp(t), dtype=torch.float64))
    assert abs(got.item() - expected) < 1e-6


def test_clip_loss_properties():
    torch.manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    # Perfectly matched pairs at a large scale: the loss goes to 0; a random pairing stays near log N.
    assert clip_loss(e, e, torch.tensor(100.0)) < 1e-3
    other = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    assert abs(clip_loss(e, other, torch.tensor(1.0)) - math.log(16)) < 0.5
    # Symmetric in its two towers.
    assert torch.allclose(clip_loss(e, other, torch.tensor(7.0)), clip_loss(other, e, torch.tensor(7.0)))


def test_hard_negatives_join_the_image_to_text_direction_only():
    torch.manual_seed(0)
    img, txt, neg = (torch.nn.functional.normalize(torch.randn(6, 8), dim=1) for _ in range(3))
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    i2t = torch.log_softmax(torch.cat([logits, scale * img @ neg.T], dim=1), dim=1).diagonal()
    t2i = torch.log_softmax(logits.T, dim=1).diagonal()
    expected = -(i2t.mean() + t2i.mean()) / 2
    assert torch.allclose(clip_loss(img, txt, scale, neg), expected, atol=1e-6)
    # More candidates can only make the right one less likely: the loss never goes down.
    assert clip_loss(img, txt, scale, neg) > clip_loss(img, txt, scale)


def test_temperature_init_and_clamp():
    model = CLIP(tiny_cfg())
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(model.scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    scale = model.scale()
    assert math.isclose(scale.item(), 100.0, rel_tol=1e-5)  # Sec. 2.5: never more than 100
    scale.backward()
    assert model.logit_scale.grad.item() == 0.0


# ---------------------------------------------------------------------------------------------- towers


@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("pool", ["cls", "mean", "max"])
def test_vit_shapes_and_errors(stem, pool):
    vit = VisionTransformer(
        ViTConfig(image_size=16, patch_size=4, width=32, depth=1, heads=2, stem=stem, pool=pool)
    )
    pooled, tokens = vit(torch.randn(3, 3, 16, 16))
    assert pooled.shape == (3, 32) and tokens.shape == (3, 1 + 16, 32)
    expected = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(1), "max": tokens[:, 1:].amax(1)}[pool]
    assert torch.equal(pooled, expected)
    with pytest.raises(DifflabError, match="built for 16x16"):
        vit(torch.randn(1, 3, 32, 32))
    with pytest.raises(DifflabError, match="patch_size 5 does not divide image_size 16"):
        ViTConfig(image_size=16, patch_size=5)
    with pytest.raises(DifflabError, match="power-of-two patch_size; got 3"):
        ViTConfig(image_size=15, patch_size=3, stem="conv")


def test_causal_padding_mask():
    mask = torch.tensor([[True, True, True, False]])
    m = causal_padding_mask(mask)[0]
    assert m[2].tolist() == [True, True, True, False]  # token 2 sees 0..2
    assert m[0].tolist() == [True, False, False, False]
    assert m[3].tolist() == [True, True, True, True]  # a padded query: the real tokens and itself
    assert causal_padding_mask(torch.tensor([[False, False]]))[0].tolist() == [[True, False], [False, True]]


def test_text_tower_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    tower = TextTransformer(
        TextTransformerConfig(vocab_size=20, context_length=8, width=16, depth=2, heads=2)
    )
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0]])
    mask = ids != 0
    pooled, tokens = tower(ids, mask)
    changed = ids.clone()
    changed[0, 3] = 9
    _, tokens2 = tower(changed, mask)
    assert torch.allclose(tokens[0, :3], tokens2[0, :3], atol=1e-6)  # earlier tokens cannot see token 3
    assert not torch.allclose(tokens[0, 3], tokens2[0, 3])
    # Whatever sits in the padding does not change the pooled ([EOS]) output.
    noisy = ids.clone()
    noisy[0, 5:] = torch.tensor([3, 4, 11])
    pooled2, _ = tower(noisy, mask)
    assert torch.allclose(pooled, pooled2, atol=1e-6)
    # The pooled output is the [EOS] token's state (position 4).
    assert torch.equal(pooled[0], tokens[0, 4])


# ------------------------------------------------------------------------------------------------ DDP


def _global_batch(cfg, n: int = 16) -> dict:
    data = captioned_scenes(cfg.data, make_tokenizer(cfg))
    items = [data[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = tiny_cfg(hard_negatives=True)
        torch.manual_seed(0)
        model = CLIP(cfg)
        batch = _global_batch(cfg)
        per = len(batch["ids"]) // world
        shard = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
        loss, _ = make_loss_fn()(model, shard, None)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():  # what DDP does to gradients: average over processes
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world
        grads["__loss__"] = loss.detach().reshape(1)
        save_file(grads, f"{out}/rank{rank}.safetensors")
        dist.barrier()  # both ranks done with gloo before either tears it down (else: SIGABRT, 1 run in ~7)
    finally:
        dist.destroy_process_group()


def test_ddp_gathered_loss_equals_single_process(tmp_path):
    """Two gloo processes, each with half of a 16-pair batch (and its hard negatives): the gathered loss
    and the DDP-averaged gradients equal one process's on the whole batch."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    cfg = tiny_cfg(hard_negatives=True)
    torch.manual_seed(0)
    model = CLIP(cfg)
    loss, _ = make_loss_fn()(model, _global_batch(cfg), None)
    loss.backward()
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert abs(got["__loss__"].item() - loss.item()) < 1e-6
        for name, p in model.named_parameters():
            assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-7), name


# ----------------------------------------------------------------------------------------------- data


def test_captioned_scenes_are_deterministic_and_mixed():
    cfg = get_preset("clip_demo").build()
    data = captioned_scenes(cfg.data, make_tokenizer(cfg), with_text=True)
    again = captioned_scenes(cfg.data, make_tokenizer(cfg), with_text=True)
    caps = [data[i]["caption"] for i in range(60)]
    assert caps == [again[i]["caption"] for i in range(60)]
    described = sum(" at the " in c or " in the center" in c for c in caps)
    assert 15 < described < 60  # about half are full descriptions (with positions), the rest vary
    item = data[0]
    assert item["image"].shape == (3, 32, 32) and item["ids"].shape == item["mask"].shape == (24,)
    toy = ToyWorldDataset(cfg.data.world, cfg.data.n, cfg.data.seed, fields=("image",))
    assert torch.equal(item["image"], toy[0]["image"])  # the toy dataset's own pixels


def test_the_scene_cache_returns_what_a_fresh_draw_would(monkeypatch):
    """Scenes are kept once drawn (captioned.SCENE_CACHE): what comes back, after eviction too, is what a
    dataset that never cached draws."""
    from difflab.data import captioned

    monkeypatch.setattr(captioned, "SCENE_CACHE", 4)
    cfg = get_preset("clip_demo").build()
    data, fresh = (captioned_scenes(cfg.data, make_tokenizer(cfg)) for _ in range(2))
    order = [0, 1, 2, 0, 3, 4, 5, 6, 0, 1, 9, 9]
    assert [data.scene(i) for i in order] == [fresh.scene(i) for i in order]
    assert data.scene(2) == captioned_scenes(cfg.data, make_tokenizer(cfg)).scene(2)
    assert len(data._scenes) == 4


def test_every_clip_preset_builds_and_takes_one_step():
    from difflab.models.registry import PRESETS

    for name, preset in PRESETS.items():
        if preset.family != "clip":
            continue
        cfg = resolve(preset.build())
        model = CLIP(cfg)
        data = captioned_scenes(cfg.data, make_tokenizer(cfg))
        batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in data[0]}
        loss, metrics = make_loss_fn()(model, batch, None)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters()), name
        assert set(metrics) == {"batch_acc", "logit_scale", "mi_bound"}


def test_config_derives_tower_sizes_and_checks_values():
    cfg = resolve(get_preset("clip_demo").build())
    assert cfg.vision.image_size == 32 and cfg.text.vocab_size == make_tokenizer(cfg).vocab_size
    with pytest.raises(DifflabError, match="describe_prob 1.5"):
        dataclasses.replace(cfg.data, describe_prob=1.5)
    with pytest.raises(DifflabError, match="unknown unknown-word policy 'loose'"):
        dataclasses.replace(cfg, unknown_words="loose")


# ---------------------------------------------------------------------------------- learning, eval, export


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("clip") / "run"
    assert main(["train", "--preset", "clip_tiny", "--out", str(run)]) == 0
    return run


def test_tiny_clip_learns_zero_shot(tiny_run):
    """Trained for seconds, the tiny model names colour and shape of held-out scenes far above chance
    (0.5 each); the same network untrained does not."""
    from difflab.models.clip import ImageTextEncoder, load_encoder
    from difflab.models.clip_eval import zero_shot
    from difflab.world.scene import world_preset

    encoder, cfg = load_encoder(tiny_run)
    world = world_preset(cfg.data.world)
    trained = zero_shot(encoder, world, 200)
    assert trained["color_accuracy"] >= 0.95 and trained["shape_accuracy"] >= 0.95, trained
    torch.manual_seed(1)
    untrained = zero_shot(ImageTextEncoder(CLIP(cfg), make_tokenizer(cfg)), world, 200)
    assert min(untrained["color_accuracy"], untrained["shape_accuracy"]) < 0.9, untrained
    log = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    # Duplicate captions in a batch (4 classes x 9 cells) keep the loss far above 0; it still falls.
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]


def test_eval_cli_json(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--n", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["zero_shot"]["n"] == 100
    assert set(report["retrieval"]) >= {"text_to_image_r1", "image_to_text_r5", "clip_score", "groups"}
    assert report["retrieval"]["clip_score"] > report["retrieval"]["clip_score_mismatched"]
    assert report["binding"]["n"] == 0  # the tiny world has one object and two colours: nothing to bind
    assert main(["eval", str(tiny_run), "--n", "100", "--plot", str(tiny_run / "search.png")]) == 0
    assert (tiny_run / "search.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--sampler", "ddim"]) == 2
    expected = "--sampler applies to diffusion runs (pixel, ldm, t2i, control, lora, instruct, depth)"
    assert expected in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--temperature", "0.5"]) == 2
    assert "--temperature applies to planner, t2i runs" in capsys.readouterr().err
    assert main(["sample", str(tiny_run)]) == 2
    assert "difflab sample draws from diffusion runs" in capsys.readouterr().err


def test_exported_text_encoder_matches_the_tower(tiny_run, tmp_path):
    from difflab.models.clip import load_encoder
    from difflab.models.text_encoder import export_text_encoder, load_text_encoder

    encoder, _ = load_encoder(tiny_run)
    texts = ["a red circle", "a large blue square in the center"]
    assert main(["export-text-encoder", str(tiny_run), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "text_encoder.safetensors").is_file()
    exported = load_text_encoder(export_text_encoder(tiny_run, tmp_path / "te"))
    direct = load_text_encoder(tiny_run)
    for frozen in (exported, direct):
        out = frozen(texts)
        assert out.tokens.shape[:2] == out.mask.shape and out.tokens.shape[2] == frozen.width
        assert torch.allclose(out.pooled, encoder.embed_texts(texts), atol=1e-6)
        assert not any(p.requires_grad for p in frozen.parameters())
        frozen.train()
        assert not frozen.training
    with pytest.raises(DifflabError, match="neither an exported text encoder"):
        load_text_encoder(tmp_path)
    (tmp_path / "te" / "text_encoder.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(DifflabError, match="not a safetensors file"):
        load_text_encoder(tmp_path / "te")


def test_unknown_prompt_words_are_named(tiny_run):
    from difflab.models.text_encoder import load_text_encoder

    with pytest.raises(DifflabError, match="purple"):
        load_text_encoder(tiny_run)(["a purple circle"])


def test_resume_is_exact(tmp_path):
    """Stopped at step 12 and resumed to 24, CLIP ends bit for bit where an uninterrupted run ends."""
    from difflab.models.clip import load_model, train

    cfg = tiny_cfg(hard_negatives=True)

    def with_steps(n):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=n, checkpoint_every=6))

    train(with_steps(24), tmp_path / "straight")
    train(with_steps(12), tmp_path / "split")
    train(with_steps(24), tmp_path / "split", resume=True)
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "split")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(DifflabError, match="already has checkpoints"):
        train(with_steps(24), tmp_path / "split")
