"""Latent diffusion end to end on the tiny presets: the autoencoder learns and measures its latent scale,
its GAN and perceptual paths run with gradients where the paper puts them, the latent cache is exactly a
fresh encoding and spares the encoder, the latent UNet learns the classes, resumes bit-exactly, and every
mismatch between the two runs is a one-line error."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch

from difflab.cli import main
from difflab.config import apply_overrides
from difflab.data.config import make_dataset
from difflab.errors import DifflabError
from difflab.models import ldm, vae
from difflab.models.codecs import Latents, Pixels
from difflab.models.recipe import make_loss_fn
from difflab.models.registry import get_preset
from difflab.models.runs import checkpoint_id
from difflab.nn.discriminator import hinge_d_loss
from difflab.nn.vae import Encoder, KLAutoencoder
from difflab.train.checkpoint import list_checkpoints, read_checkpoint


class EncoderCalled(RuntimeError):
    pass


# one torch thread (tests/conftest.py), module-scoped so it holds while the module's fixtures train
pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    return vae.train(get_preset("vae_tiny").build(), tmp_path_factory.mktemp("vae") / "run")


def _ldm_cfg(vae_run, *overrides):
    return apply_overrides(get_preset("ldm_tiny").build(), [f"vae={vae_run}", *overrides])


@pytest.fixture(scope="module")
def ldm_run(vae_run, tmp_path_factory):
    return ldm.train(_ldm_cfg(vae_run), tmp_path_factory.mktemp("ldm") / "run")


def _held_out(cfg: vae.VAEConfig, n: int) -> torch.Tensor:
    data = make_dataset(dataclasses.replace(vae.held_out(cfg.data), n=n))
    return torch.stack([data[i]["image"] for i in range(n)])


def _no_encoder(monkeypatch):
    def refuse(*args, **kwargs):
        raise EncoderCalled("the encoder ran")

    monkeypatch.setattr(KLAutoencoder, "encode", refuse)
    monkeypatch.setattr(Encoder, "forward", refuse)


# --- the autoencoder ---------------------------------------------------------------------------------


def test_vae_reconstructs_the_scenes_the_reader_sees(vae_run):
    report = vae.evaluate(vae_run, 200)
    assert report["n"] == 200 and report["latent_shape"] == [4, 8, 8] and report["compression"] == 3.0
    assert report["exact_scene_accuracy_originals"] == 1.0  # the judge itself is exact on this world
    assert report["exact_scene_accuracy"] >= 0.8
    # Trivial baseline: every held-out image reconstructed as the mean training image (~15.5 dB).
    _, cfg = vae.load_model(vae_run)
    train_set = make_dataset(cfg.data)
    mean_image = torch.stack([train_set[i]["image"] for i in range(512)]).mean(0)
    x = _held_out(cfg, 200)
    baseline = float(vae.psnr(mean_image.expand_as(x), x).mean())
    assert report["psnr_db"] >= baseline + 5.0, (report["psnr_db"], baseline)
    for name in ("config.json", "metrics.jsonl", "reconstructions.png", "latent_stats.json"):
        assert (vae_run / name).is_file(), name


def test_latent_stats_are_the_std_of_the_posterior_means(vae_run):
    stats = json.loads((vae_run / "latent_stats.json").read_text())
    assert stats["scale"] == pytest.approx(1.0 / stats["std"], rel=1e-12)
    assert stats["n"] == 256 and stats["latent_shape"] == [4, 8, 8]
    assert stats["checkpoint"] == list_checkpoints(vae_run / "checkpoints")[-1][1].name
    autoencoder, cfg = vae.load_model(vae_run)
    z = vae.encode_dataset(autoencoder, make_dataset(cfg.data), range(256), batch_size=64)["mean"]
    assert z.shape == (256, 4, 8, 8)
    assert stats["std"] == pytest.approx(float(z.std()), rel=1e-4)
    assert stats["mean"] == pytest.approx(float(z.mean()), abs=1e-4)
    assert vae.latent_stats(vae_run)["scale"] == stats["scale"]  # read back, not recomputed


def test_encode_decode_round_trip(vae_run):
    autoencoder, cfg = vae.load_model(vae_run)
    x = _held_out(cfg, 64)
    with torch.no_grad():
        posterior = autoencoder.encode(x)
        rec = autoencoder.decode(posterior.mode())
        sampled, _ = autoencoder(x, torch.Generator().manual_seed(0))
    assert float(vae.psnr(rec, x).mean()) > 20.0
    assert float(vae.psnr(rec, x).min()) > 15.0
    # the posterior is narrow next to the spread of the means, so a sample decodes almost as well
    assert float(posterior.std.mean()) < 0.1 * float(posterior.mean.std())
    assert float(vae.psnr(sampled, x).mean()) > float(vae.psnr(rec, x).mean()) - 1.0


def test_vae_without_gan_has_no_discriminator(vae_run):
    state, _ = read_checkpoint(list_checkpoints(vae_run / "checkpoints")[-1][1])
    assert any(k.startswith("autoencoder.") for k in state["model"])
    assert not any(k.startswith("discriminator") for k in state["model"])
    records = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
    assert not any("g_adv" in r or "d_loss" in r for r in records)
    assert records[-1]["rec"] < 0.5 * records[0]["rec"]


def test_gan_and_perceptual_paths_train(tmp_path):
    cfg = apply_overrides(
        get_preset("vae_tiny").build(),
        ["loss.gan_weight=0.5", "loss.gan_start=2", "loss.perceptual_weight=0.5", "loss.disc_channels=8",
         "train.steps=6", "train.log_every=1", "train.checkpoint_every=2", "latent_stats_n=16", "grid=2"],
    )  # fmt: skip
    run = vae.train(cfg, tmp_path / "gan")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert "perceptual" in r and r["perceptual"] > 0
        on = r["step"] > 2  # gan_start=2: the adversarial terms are on from the third step
        assert all((k in r) == on for k in ("g_adv", "d_loss", "gan_lambda")), r
    states = {step: read_checkpoint(path)[0]["model"] for step, path in list_checkpoints(run / "checkpoints")}
    assert sorted(states) == [2, 4, 6]
    disc = sorted(k for k in states[6] if k.startswith("discriminator."))
    assert disc and all(k in states[2] for k in disc)
    torch.manual_seed(cfg.train.seed)  # the initial weights, as train() draws them
    initial = vae.VAETrainee(vae.resolve(cfg)).state_dict()
    # no gradient reached the discriminator before gan_start; afterwards its hinge loss trained it
    assert all(torch.equal(states[2][k], initial[k]) for k in disc)
    assert any(not torch.equal(states[6][k], states[2][k]) for k in disc)
    assert int(states[6]["steps_seen"]) == 6
    assert not torch.equal(
        states[6]["autoencoder.decoder.conv_out.weight"], states[2]["autoencoder.decoder.conv_out.weight"]
    )


def test_gan_start_counts_optimizer_steps_under_grad_accum(tmp_path):
    cfg = apply_overrides(
        get_preset("vae_tiny").build(),
        ["loss.gan_weight=0.5", "loss.gan_start=2", "loss.disc_channels=8", "train.grad_accum=2",
         "train.steps=3", "train.log_every=1", "latent_stats_n=16", "grid=2"],
    )  # fmt: skip
    run = vae.train(cfg, tmp_path / "accum")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [("g_adv" in r) for r in records] == [False, False, True]


def test_each_adversarial_loss_reaches_only_its_own_network():
    """Reference gradients from an independent split: the generator term through a frozen *copy* of the
    discriminator, the hinge loss on a detached reconstruction. A plain ``disc(rec)`` in the generator
    term would push the discriminator toward calling fakes real; a non-detached ``rec`` in the hinge
    loss would train the decoder to help the discriminator. Either breaks the equality below."""
    cfg = vae.resolve(apply_overrides(
        get_preset("vae_tiny").build(),
        ["loss.gan_weight=0.7", "loss.gan_start=0", "loss.kl_weight=0.01", "loss.disc_channels=8"],
    ))  # fmt: skip
    torch.manual_seed(0)
    trainee = vae.VAETrainee(cfg)
    x = _held_out(cfg, 8)
    loss, metrics = vae.make_loss_fn(cfg)(trainee, {"image": x}, torch.Generator().manual_seed(1))
    assert {"g_adv", "d_loss", "gan_lambda"} <= metrics.keys() and int(trainee.steps_seen) == 1
    loss.backward()
    got = {k: p.grad.clone() for k, p in trainee.named_parameters()}
    trainee.zero_grad(set_to_none=True)

    ae, disc = trainee.autoencoder, trainee.discriminator
    rec, posterior = ae(x, torch.Generator().manual_seed(1))
    pixels = x[0].numel()
    frozen = copy.deepcopy(disc).requires_grad_(False)
    g_adv = -frozen(rec).mean()
    lam = metrics["gan_lambda"]
    assert float(lam) > 0
    ae_loss = (rec - x).abs().mean() + 0.01 * posterior.kl().mean() / pixels + lam * g_adv
    d_loss = hinge_d_loss(disc(x), disc(rec.detach()))
    torch.testing.assert_close(loss, ae_loss + d_loss)
    ae_grads = torch.autograd.grad(ae_loss, list(ae.parameters()), retain_graph=True)
    d_grads = torch.autograd.grad(d_loss, list(disc.parameters()))
    for (name, _), g in zip(ae.named_parameters(), ae_grads, strict=True):
        torch.testing.assert_close(got[f"autoencoder.{name}"], g, rtol=1e-4, atol=1e-7, msg=name)
    for (name, _), g in zip(disc.named_parameters(), d_grads, strict=True):
        torch.testing.assert_close(got[f"discriminator.{name}"], g, rtol=1e-4, atol=1e-7, msg=name)
    # and the generator term does reach the decoder: without it the decoder's gradient differs
    (no_gan,) = torch.autograd.grad(ae_loss - lam * g_adv, [ae.last_layer])
    assert not torch.allclose(got["autoencoder.decoder.conv_out.weight"], no_gan, rtol=1e-3, atol=1e-6)


# --- the latent cache --------------------------------------------------------------------------------


def test_latent_cache_is_a_fresh_encoding_and_is_read_back(vae_run, ldm_run, monkeypatch):
    cfg = ldm.load_config(ldm_run)  # attached: vae path, checkpoint id, scale
    cache = vae_run / "latent_cache"
    files = sorted(cache.iterdir())
    assert any(p.name.startswith("latents-") and p.suffix == ".safetensors" for p in files)
    autoencoder, _ = vae.load_model(vae_run)
    images = make_dataset(cfg.data)
    fresh = vae.encode_dataset(autoencoder, images, range(len(images)))

    _no_encoder(monkeypatch)
    data = ldm.latent_dataset(cfg)  # the ldm run built the cache: now it is only read
    assert len(data) == len(images) == 2048
    assert torch.equal(data.arrays["mean"], fresh["mean"])
    assert torch.equal(data.arrays["std"], fresh["std"])
    assert data.arrays["label"].tolist() == [int(images[i]["label"]) for i in range(len(images))]
    item = data[5]
    assert item.keys() == {"mean", "std", "label"} and item["mean"].shape == (4, 8, 8)
    with pytest.raises(EncoderCalled):  # the patch bites: other data is not in the cache
        ldm.latent_dataset(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n=32)))
    monkeypatch.undo()

    for data_cfg in (dataclasses.replace(cfg.data, n=64), dataclasses.replace(cfg.data, n=64, seed=5)):
        before = set(cache.iterdir())
        small = ldm.latent_dataset(dataclasses.replace(cfg, data=data_cfg))
        assert len(small) == 64 and len(set(cache.iterdir()) - before) == 1  # a new key, a new file
    assert not torch.allclose(small.arrays["mean"], fresh["mean"][:64])  # seed 5: other scenes
    same_seed = ldm.latent_dataset(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n=64)))
    torch.testing.assert_close(same_seed.arrays["mean"], fresh["mean"][:64], rtol=1e-5, atol=1e-5)


def test_training_never_runs_the_encoder_once_the_cache_exists(vae_run, ldm_run, tmp_path, monkeypatch):
    files = set((vae_run / "latent_cache").iterdir())
    _no_encoder(monkeypatch)
    cfg = _ldm_cfg(vae_run, "train.steps=3", "sample.grid=2", "sample.steps=2")
    run = ldm.train(cfg, tmp_path / "run")
    assert (run / "samples.png").is_file()  # the decoder ran for the grid; the encoder never did
    assert set((vae_run / "latent_cache").iterdir()) == files


# --- latent diffusion --------------------------------------------------------------------------------


def test_ldm_learns_the_classes(ldm_run):
    report = ldm.evaluate(ldm_run, 128)
    assert report["judge"] == "toy-world reader"
    assert report["class_accuracy"] >= 0.6, report  # 4 classes: chance is 0.25
    for name in ("config.json", "metrics.jsonl", "samples.png", "trajectory.png"):
        assert (ldm_run / name).is_file(), name


def test_ldm_config_holds_the_vae_run_it_was_trained_on(vae_run, ldm_run):
    saved = json.loads((ldm_run / "config.json").read_text())
    stats = json.loads((vae_run / "latent_stats.json").read_text())
    assert saved["kind"] == "ldm" and saved["vae"] == str(vae_run.resolve())
    assert saved["latent_scale"] == stats["scale"]
    assert saved["vae_checkpoint"] == checkpoint_id(vae_run, "autoencoder run")
    assert saved["vae_checkpoint"].startswith(stats["checkpoint"] + ":")
    _, vae_cfg = vae.load_model(vae_run)
    c, h, w = vae_cfg.vae.latent_shape
    unet = saved["unet"]
    assert unet["in_channels"] == unet["out_channels"] == c and unet["image_size"] == h == w

    model, cfg = ldm.load_model(ldm_run)
    assert model.codec.scale == stats["scale"] and cfg.unet.in_channels == c
    images = ldm.generate(model, cfg, 4, labels=torch.tensor([0, 1, 2, 3]), seed=1, steps=4)
    assert images.shape == (4, 3, 16, 16) and images.abs().max() <= 1.0
    again = ldm.generate(model, cfg, 4, labels=torch.tensor([0, 1, 2, 3]), seed=1, steps=4)
    assert torch.equal(images, again)


def test_loss_trains_on_scaled_latents(vae_run, ldm_run):
    """posterior='mode' is the pixel loss on scale * mean; 'sample' draws z = mean + std * eps first."""
    cfg = ldm.load_config(ldm_run)
    system, _ = ldm.load_model(ldm_run)
    unet, labels = system.network, system.conditioner
    schedule = cfg.diffusion.make_schedule()
    gen = torch.Generator().manual_seed(0)
    batch = {"mean": torch.randn(6, 4, 8, 8, generator=gen), "std": torch.rand(6, 4, 8, 8, generator=gen),
             "label": torch.tensor([0, 1, 2, 3, 0, 1])}  # fmt: skip
    inner = make_loss_fn(cfg, schedule, labels, Pixels())
    with torch.no_grad():
        mode = make_loss_fn(cfg, schedule, labels, Latents(None, cfg.latent_scale, posterior="mode"))
        expected = inner(unet, {"image": batch["mean"] * cfg.latent_scale, "label": batch["label"]},
                         torch.Generator().manual_seed(3))[0]  # fmt: skip
        torch.testing.assert_close(mode(unet, batch, torch.Generator().manual_seed(3))[0], expected)
        wide = {**batch, "std": batch["std"] * 100}
        torch.testing.assert_close(mode(unet, wide, torch.Generator().manual_seed(3))[0], expected)

        sample = make_loss_fn(cfg, schedule, labels, Latents(None, cfg.latent_scale, posterior="sample"))
        g = torch.Generator().manual_seed(3)
        z = batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=g)
        expected = inner(unet, {"image": z * cfg.latent_scale, "label": batch["label"]}, g)[0]
        torch.testing.assert_close(sample(unet, batch, torch.Generator().manual_seed(3))[0], expected)


def test_ldm_resume_is_bit_exact(vae_run, tmp_path):
    cfg = _ldm_cfg(vae_run, "train.steps=12", "train.checkpoint_every=6", "sample.grid=2", "sample.steps=2")
    ldm.train(cfg, tmp_path / "straight")
    ldm.train(apply_overrides(cfg, ["train.steps=6"]), tmp_path / "split")
    ldm.train(cfg, tmp_path / "split", resume=True)
    for ema in (False, True):
        a, _ = ldm.load_model(tmp_path / "straight", ema=ema)
        b, _ = ldm.load_model(tmp_path / "split", ema=ema)
        for (name, p), q in zip(a.network.state_dict().items(), b.network.state_dict().values(), strict=True):
            assert torch.equal(p, q), (ema, name)


# --- errors ------------------------------------------------------------------------------------------


def test_ldm_needs_a_matching_vae_run(vae_run, ldm_run, tmp_path, capsys):
    with pytest.raises(DifflabError, match="vae="):
        ldm.train(get_preset("ldm_tiny").build(), tmp_path / "a")
    assert main(["train", "--preset", "ldm_tiny", "--out", str(tmp_path / "b")]) == 2
    assert "--set vae=RUN_DIR" in capsys.readouterr().err
    # ldm_toy diffuses single32 latents at 32px; the vae run saw the tiny world at 16px
    other = apply_overrides(get_preset("ldm_toy").build(), [f"vae={vae_run}"])
    with pytest.raises(DifflabError, match="trained on toy/tiny at 16px; this model's data is toy/single32"):
        ldm.train(other, tmp_path / "c")
    with pytest.raises(DifflabError, match="holds a 'ldm' run; expected an autoencoder"):
        ldm.train(_ldm_cfg(ldm_run), tmp_path / "d")
    with pytest.raises(DifflabError, match="not a difflab run directory"):
        ldm.train(_ldm_cfg(tmp_path / "nothing"), tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "abcde")  # refused before writing anything


def test_a_retrained_vae_invalidates_the_ldm_run(vae_run, tmp_path, capsys):
    vae_copy = tmp_path / "vae"
    shutil.copytree(vae_run, vae_copy)  # latent_cache included: same checkpoint, same key
    run = ldm.train(_ldm_cfg(vae_copy, "train.steps=2", "sample.grid=2", "sample.steps=2"), tmp_path / "ldm")
    ldm.load_model(run)  # fine while the vae run is as it was
    vae.train(apply_overrides(vae.load_config(vae_copy), ["train.steps=301"]), vae_copy, resume=True)
    with pytest.raises(DifflabError, match="has changed since"):
        ldm.load_model(run)
    assert main(["sample", str(run), "--n", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "changed" in capsys.readouterr().err
    with pytest.raises(DifflabError, match="cannot resume"):
        ldm.train(_ldm_cfg(vae_copy, "train.steps=4", "sample.grid=2", "sample.steps=2"), run, resume=True)


def test_diffusion_options_on_a_vae_run_are_errors(vae_run, capsys):
    assert main(["eval", str(vae_run), "--steps", "5", "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "--steps applies to diffusion runs" in err and err.count("\n") == 1
    assert main(["sample", str(vae_run), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "is a vae run" in err and "Traceback" not in err


# --- command line ------------------------------------------------------------------------------------


def test_cli_eval_of_a_vae_run(vae_run, capsys):
    assert main(["eval", str(vae_run), "--json", "--n", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = {"n", "psnr_db", "l1", "latent_shape", "compression", "downsample_factor", "latent_scale",
                "exact_scene_accuracy", "exact_scene_accuracy_originals", "attribute_accuracy", "judge"}  # fmt: skip
    assert expected <= report.keys()
    assert (
        report["n"] == 50 and report["downsample_factor"] == 2 and 0.0 <= report["exact_scene_accuracy"] <= 1
    )
    assert set(report["attribute_accuracy"]) == {"shape", "color", "size", "position"}


def test_cli_train_and_sample_an_ldm_run(vae_run, tmp_path, capsys):
    out = tmp_path / "ldm"
    argv = ["train", "--preset", "ldm_tiny", "--set", f"vae={vae_run}", "--set", "train.steps=2",
            "--set", "sample.grid=2", "--set", "sample.steps=2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "samples.png" in capsys.readouterr().out
    grid, traj = tmp_path / "grid.png", tmp_path / "traj.png"
    assert (
        main(["sample", str(out), "--n", "4", "--steps", "3", "--out", str(grid), "--trajectory", str(traj)])
        == 0
    )
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and traj.is_file()


@pytest.mark.parametrize("preset", ["vae_f4", "ldm_toy"])
def test_cli_info_of_latent_presets(preset, capsys):
    assert main(["info", "--preset", preset, "--set", "train.batch_size=2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"] == preset and report["batch_size"] == 2
    assert report["parameters"] > 0 and report["flops_per_training_step"] > 0


def test_pixel_patches_fold_and_unfold_exactly_and_normalise():
    """Space-to-depth with p = 2: pixel (y, x) of channel c lands in channel c * 4 + (y % 2) * 2 + x % 2 at
    (y // 2, x // 2) (torch's pixel_unshuffle order); decoding is the exact inverse."""
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    codec = Pixels(patch=2, shift=-0.5, scale=4.0)
    z = codec.encode(images)
    assert z.shape == (2, 12, 4, 4)
    assert torch.allclose(z[:, 1 * 4 + 1 * 2 + 0, 2, 3], (images[:, 1, 5, 6] + 0.5) * 4.0)
    assert torch.allclose(codec.decode(z), images, atol=1e-6)
    assert torch.equal(Pixels().decode(Pixels().encode(images)), images)
