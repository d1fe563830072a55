"""Pixel diffusion end to end on the tiny preset: it learns, it resumes exactly, the CLI drives it."""

import json

import pytest
import torch

from difflab.cli import main
from difflab.config import apply_overrides
from difflab.errors import DifflabError
from difflab.models.codecs import Pixels
from difflab.models.conditioners import class_conditioner
from difflab.models.pixel import generate, load_model, train
from difflab.models.registry import get_preset
from difflab.models.system import DiffusionSystem
from difflab.nn.unet import UNet
from difflab.world.reader import read
from difflab.world.scene import world_preset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    train(get_preset("tiny").build(), run)
    return run


def test_run_directory_has_everything(tiny_run):
    for name in ("config.json", "metrics.jsonl", "samples.png", "trajectory.png"):
        assert (tiny_run / name).is_file(), name
    assert list((tiny_run / "checkpoints").glob("step_*/state.safetensors"))
    losses = [json.loads(line)["loss"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]  # the loss falls


def test_tiny_model_learns_colour_far_above_chance(tiny_run):
    # The tiny world has two colours, so a model that ignores its class label gets about 0.5.
    model, cfg = load_model(tiny_run)
    n, world = 32, world_preset("tiny")
    labels = torch.arange(n) % cfg.unet.num_classes
    images = generate(model, cfg, n, labels=labels, seed=3)
    hits = 0
    for image, label in zip(images, labels.tolist(), strict=True):
        objects = read(image, world).objects
        hits += len(objects) == 1 and objects[0].color == world.class_name(label)[1]
    assert hits / n >= 0.9


def test_clip_x0_bounds_every_guided_x0(tiny_run):
    model, cfg = load_model(tiny_run)
    x0s = []
    clipped = apply_overrides(cfg, ["sample.clip_x0=true"])
    generate(model, clipped, 8, cfg_scale=8.0, seed=0, callback=lambda i, x, t, x0: x0s.append(x0))
    assert len(x0s) == cfg.sample.steps and all(float(x0.abs().max()) <= 1.0 for x0 in x0s)
    free = []
    generate(model, cfg, 8, cfg_scale=8.0, seed=0, callback=lambda i, x, t, x0: free.append(x0))
    assert max(float(x0.abs().max()) for x0 in free) > 1.0  # w = 8 overshoots without the clamp


def test_resume_is_bit_exact(tmp_path):
    cfg = apply_overrides(
        get_preset("tiny").build(), ["train.steps=12", "train.checkpoint_every=6", "sample.grid=4"]
    )
    train(cfg, tmp_path / "straight")
    train(apply_overrides(cfg, ["train.steps=6"]), tmp_path / "split")
    train(cfg, tmp_path / "split", resume=True)
    a, _ = load_model(tmp_path / "straight", ema=False)
    b, _ = load_model(tmp_path / "split", ema=False)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_training_into_a_used_run_dir_needs_resume(tiny_run):
    with pytest.raises(DifflabError, match="already has checkpoints; pass --resume"):
        train(get_preset("tiny").build(), tiny_run)


def test_cli_sample_and_eval(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(tiny_run), "--n", "8", "--sampler", "dpmpp_2m", "--steps", "8", "--out", str(out),
                 "--trajectory", str(tmp_path / "traj.png")]) == 0  # fmt: skip
    assert out.is_file() and (tmp_path / "traj.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--n", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 16 and 0.0 <= report["class_accuracy"] <= 1.0 and report["frechet_distance"] >= 0.0
    assert report["frechet_feature_space"].startswith("pixels8")


def test_cli_errors_are_one_line(tiny_run, capsys):
    assert main(["sample", str(tiny_run), "--class", "9", "--n", "2"]) == 2
    assert "class 9 is out of range; expected 0..3" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--set", "train.lrr=1", "--out", "x"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["eval", "no/such/run"]) == 2
    assert "not a difflab run directory" in capsys.readouterr().err


def test_sampler_options_reach_the_sampler():
    """``sampler_options`` go to the sampler itself: the SDE solver with eta = 0 is DPM-Solver++(2M)."""
    from difflab.models import pixel as pixel_model

    cfg = pixel_model.resolve(get_preset("tiny").build())
    torch.manual_seed(0)
    model = DiffusionSystem(UNet(cfg.unet), class_conditioner(cfg.data, cfg.cond_drop), Pixels()).eval()
    with torch.no_grad():
        ode = pixel_model.generate(model, cfg, 4, sampler="dpmpp_2m", steps=5, seed=0)
        sde0 = pixel_model.generate(
            model, cfg, 4, sampler="dpmpp_2m_sde", steps=5, seed=0, sampler_options={"eta": 0.0}
        )
        sde = pixel_model.generate(model, cfg, 4, sampler="dpmpp_2m_sde", steps=5, seed=0)
    assert torch.equal(ode, sde0) and not torch.equal(ode, sde)
