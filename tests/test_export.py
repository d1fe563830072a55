"""``difflab export --format diffusers``: diffusers' own classes, an independent implementation, load the
exported folder and compute what difflab computes (1e-5 on the same inputs); the scheduler holds the run's
schedule; a diffusers UNet folder loads back into difflab's UNet; the kinds that do not map are refused
with the reason. Nothing is trained: tiny UNets with random weights, moved away from their initialisation
(whose zero output convolutions would hide a wrong mapping), saved as a run directory."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from difflab.cli import main
from difflab.config import apply_overrides, save_json, to_dict
from difflab.diffusion.samplers import SAMPLERS
from difflab.errors import DifflabError
from difflab.models import pixel
from difflab.models.export import (
    export_diffusers,
    load_diffusers_unet,
    refusal,
    scheduler_config,
    unet_refusal,
)
from difflab.models.recipe import DiffusionConfig, SampleConfig, run_sampler
from difflab.models.registry import PRESETS, get_preset
from difflab.nn.unet import UNet
from difflab.train.checkpoint import save_checkpoint

diffusers = pytest.importorskip("diffusers")
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # numpy 2 deprecation inside diffusers' Heun scheduler, not ours
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

VARIANTS = {
    # class-conditional on 2 shapes x 2 colours (a factorised class embedding), attention in the middle only
    "tiny": [],
    # unconditional, attention at every level (AttnDownBlock2D / AttnUpBlock2D), heads of a fixed width
    "attention": ["data.conditional=false", "unet.attention_resolutions=16,8", "unet.head_dim=8"],
}


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``module`` with every weight moved by N(0, 0.1^2): no zero convolution, no unit GroupNorm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def write_run(run_dir, cfg, unet=None):
    """A run directory as training leaves it: config.json and a checkpoint of the model."""
    run_dir.mkdir(parents=True)
    save_json(to_dict(cfg), run_dir / "config.json")
    if unet is not None:
        save_checkpoint(run_dir / "checkpoints", 1, {"model": unet.state_dict()})
    return run_dir


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    cfg = pixel.resolve(apply_overrides(get_preset("tiny").build(), VARIANTS[request.param]))
    unet = perturbed(UNet(cfg.unet))
    run = write_run(root / "run", cfg, unet)
    return unet, cfg, run, export_diffusers(run, root / "out").out


def inputs(cfg, batch: int = 4):
    """Noisy images, timesteps from both ends of the schedule, and every class label with the null one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size, generator=g)
    t = torch.tensor([0, 1, 500, 999])[:batch]
    labels = (
        {"class_labels": torch.arange(batch) % (cfg.unet.num_classes + 1)} if cfg.unet.num_classes else {}
    )
    return x, t, labels


@torch.no_grad()
def test_unet2dmodel_computes_what_difflab_computes(exported):
    unet, cfg, _, out = exported
    theirs = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    x, t, labels = inputs(cfg, 4)
    ours = unet(x, t, **labels)
    assert (theirs(x, t, **labels).sample - ours).abs().max() < 1e-5
    assert ours.abs().max() > 0.5  # a network that computes something, not the zeros of its initialisation
    # and back: the exported folder read into difflab's UNet is the same network
    assert torch.equal(load_diffusers_unet(out / "unet")(x, t, **labels), ours)
    assert (out / "model_index.json").is_file() == (cfg.unet.num_classes is None)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]  # written whole, then renamed


@torch.no_grad()
def test_docs_snippet_samples_what_difflab_samples(exported):
    """docs/export.md's loop over diffusers' DDIM scheduler draws difflab's DDIM samples from the same x_T."""
    unet, cfg, _, out = exported
    n = 4
    cond = {"class_labels": torch.tensor([0, 1, 2, 3])} if cfg.unet.num_classes else {}
    ours = run_sampler(unet, cfg, n, cond, None, seed=0)  # the run's defaults: DDIM, 10 steps, trailing
    theirs = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(out / "scheduler")
    scheduler.set_timesteps(cfg.sample.steps)
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        x = scheduler.step(theirs(x, t, **cond).sample, t, x).prev_sample
    assert (x - ours).abs().max() < 1e-4 * ours.abs().max()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("schedule,zero_snr", [("cosine", False), ("linear", True), ("sigmoid", False)])
def test_scheduler_config_holds_the_runs_schedule(sampler, schedule, zero_snr):
    d = DiffusionConfig(schedule=schedule, rescale_zero_snr=zero_snr, prediction="epsilon")
    config = scheduler_config(d, SampleConfig(sampler=sampler, spacing="leading"))
    cls = getattr(diffusers, config["_class_name"])
    assert cls.extract_init_dict(config)[1] == {}  # every key is one the scheduler takes
    theirs, ours = cls.from_config(config), d.make_schedule()
    # diffusers holds float32 (its cumprod of 1000 factors), we float64: 1e-5 relative is ~100 ulps, as
    # test_diffusion_schedules allows. At zero terminal SNR its DPM-Solver and Euler put 2^-24 for the last
    # alpha_bar, to keep sigma finite.
    assert (theirs.betas.double() - ours.betas).abs().max() < 1e-5 * ours.betas.max()
    assert torch.allclose(theirs.alphas_cumprod[:-1].double(), ours.alphas_cumprod[:-1], rtol=1e-5, atol=1e-9)
    assert abs(theirs.alphas_cumprod[-1].item() - ours.alphas_cumprod[-1].item()) <= 2**-24
    assert theirs.config.prediction_type == "epsilon" and theirs.config.timestep_spacing == "leading"


@torch.no_grad()
def test_a_diffusers_unet_folder_loads_into_difflab(tmp_path):
    """A UNet2DModel built and saved by diffusers itself (the attention layout difflab's UNet has)."""
    theirs = diffusers.UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        attn_norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", num_class_embeds=3,
    )  # fmt: skip
    perturbed(theirs)
    for name, p in theirs.named_parameters():  # difflab's q/k/v projections have no bias
        if name.endswith(("to_q.bias", "to_k.bias", "to_v.bias")):
            p.zero_()
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_diffusers_unet(tmp_path / "unet")
    assert ours.cfg.num_classes == 2 and ours.cfg.attention_resolutions == (4,) and ours.cfg.head_dim == 4
    x, t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 400, 999])
    labels = torch.tensor([0, 1, 2])
    assert (ours(x, t, class_labels=labels) - theirs(x, t, class_labels=labels).sample).abs().max() < 1e-5

    # what does not map is refused by name: a query bias, the time embedding added before the norm
    q_bias = next(p for n, p in theirs.named_parameters() if n.endswith("to_q.bias"))
    q_bias.fill_(0.5)
    theirs.save_pretrained(tmp_path / "biased")
    with pytest.raises(DifflabError, match=r"to_q\.bias' is nonzero .*have no bias"):
        load_diffusers_unet(tmp_path / "biased")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "config.json").write_text(
        json.dumps({**config, "resnet_time_scale_shift": "default"})
    )
    with pytest.raises(DifflabError, match="resnet_time_scale_shift 'default' does not map .*'scale_shift'"):
        load_diffusers_unet(tmp_path / "default")


def test_every_pixel_preset_maps_and_every_other_kind_is_refused(tmp_path):
    for name, preset in PRESETS.items():
        cfg = preset.build()
        if preset.family == "pixel":
            assert unet_refusal(dataclasses.replace(cfg.unet, image_size=cfg.data.image_size)) is None, name
        else:  # refused from config.json alone, before any weight is read
            why = refusal(write_run(tmp_path / name, cfg))
            assert why is not None and "does not map onto diffusers' classes" in why, name
    assert "AutoencoderKL has no space-to-depth" in refusal(tmp_path / "vae_tiny")
    assert "decodes through an autoencoder run" in refusal(tmp_path / "ldm_tiny")
    assert "Transformer2DModel" in refusal(tmp_path / "t2i_tiny")
    assert "text refiner" in refusal(tmp_path / "t2i_demo")
    assert "joint attention" in refusal(tmp_path / "t2i_mmdit_tiny")
    assert "GLIGEN grounding" in refusal(tmp_path / "t2i_layout_tiny")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["unet.attention_positions=true"], "learned position embedding in every attention layer"),
        # level 0 (16 px, 16 channels) and the middle (32 channels) at 2 heads: heads of 8 and 16 channels
        (["unet.attention_resolutions=16"], "into heads of [8, 16] channels, and UNet2DModel has one"),
    ],
)
def test_a_pixel_unet_that_does_not_map_is_refused(tmp_path, overrides, message, capsys):
    cfg = pixel.resolve(apply_overrides(get_preset("tiny").build(), overrides))
    run = write_run(tmp_path / "run", cfg)
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_exports_and_never_overwrites(exported, tmp_path, capsys):
    _, cfg, run, _ = exported
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "out")]) == 0
    assert "UNet2DModel" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "unet" / "config.json").read_text())["sample_size"] == 16
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
