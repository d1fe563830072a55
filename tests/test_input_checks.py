"""Inputs are checked before any work starts: every ``--set`` value, every field of a hand-edited
config.json and every numeric flag is either accepted (and then builds a network that runs) or refused
with one line naming the bad key or flag and its value, exit 2. Never a traceback, never a silent
fallback. Explicit cases for each input an adversarial tester found, then generated ones."""

from __future__ import annotations

import json
import math
import re
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difflab.cli import main
from difflab.config import _strip_optional, apply_overrides, from_dict, to_dict, valid_keys
from difflab.errors import DifflabError
from difflab.models import pixel
from difflab.models.registry import get_family, get_preset

TINY_PRESETS = ("tiny", "vae_tiny", "ldm_tiny", "clip_tiny", "planner_tiny", "t2i_tiny", "t2i_mmdit_tiny", "lm_tiny",
                "vlm_tiny")


def refused(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must refuse with exit 2 (a returned 2, or argparse's SystemExit(2)) and
    one message on stderr, which is returned. Any other exception fails the test with its traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------ --set KEY=VALUE


@pytest.mark.parametrize(
    "preset, override, named",
    [
        ("tiny", "unet.channels=0", "channels 0 is invalid"),
        ("tiny", "unet.channels=-16", "channels -16 is invalid"),
        ("tiny", "unet.heads=0", "heads 0 is invalid"),
        ("tiny", "unet.heads=3", "heads 3 does not divide the attention width"),
        ("tiny", "unet.norm_groups=0", "norm_groups 0 is invalid"),
        ("tiny", "unet.norm_groups=3", "not divisible by norm_groups=3"),
        ("tiny", "unet.head_dim=0", "head_dim 0 is invalid"),
        ("tiny", "unet.dropout=1.5", "dropout 1.5 is invalid; expected a finite number in [0, 1)"),
        ("tiny", "unet.dropout=nan", "dropout nan is invalid"),
        ("tiny", "unet.channel_mult=", "channel_mult () is invalid; expected one or more integers"),
        ("tiny", "unet.channel_mult=1,0", "channel_mult (1, 0) is invalid"),
        ("tiny", "unet.attention_resolutions=0", "attention_resolutions (0,) is invalid"),
        ("tiny", "unet.grounding_gate=inf", "grounding_gate inf is invalid"),
        ("tiny", "unet.context_pool=true", "context_pool is set but context_dim is None"),
        ("tiny", "train.betas=2,3", "beta 2.0 is invalid; expected a finite number in [0, 1)"),
        ("tiny", "train.betas=0.9,1", "beta 1.0 is invalid"),
        ("tiny", "train.betas=0.9,0.99,0.9", "'train.betas'; expected 2 comma-separated values"),
        ("tiny", "train.eps=-1", "eps -1.0 is invalid; expected a finite number > 0"),
        ("tiny", "train.eps=0", "eps 0.0 is invalid"),
        ("tiny", f"train.seed={2**70}", f"seed {2**70} is invalid; expected an integer in [0, 2**63)"),
        ("tiny", "train.seed=-1", "seed -1 is invalid"),
        ("tiny", "train.weight_decay=-0.1", "weight_decay -0.1 is invalid; expected a finite number >= 0"),
        ("tiny", f"train.warmup_steps={10**18}", f"warmup_steps {10**18} is invalid; expected an integer in [0,"),
        ("tiny", "train.warmup_steps=-1", "warmup_steps -1 is invalid"),
        ("tiny", "train.lr=nan", "lr nan is invalid; expected a finite number > 0"),
        ("tiny", "train.lr=inf", "lr inf is invalid"),
        ("tiny", "train.lr=0", "lr 0.0 is invalid"),
        ("tiny", "train.steps=0", "steps 0 is invalid"),
        ("tiny", "train.steps=10000000000", "steps 10000000000 is invalid; expected an integer in [1, 10**9]"),
        ("tiny", "train.batch_size=0", "batch_size 0 is invalid"),
        ("tiny", "train.grad_accum=0", "grad_accum 0 is invalid"),
        ("tiny", "train.grad_clip=inf", "bad grad_clip inf"),
        ("tiny", "train.ema_decay=nan", "bad ema_decay nan"),
        ("tiny", "train.min_lr_ratio=-inf", "min_lr_ratio -inf is invalid"),
        ("tiny", "train.sample_every=0", "sample_every 0 is invalid; expected an integer in [1, 10**9] or None"),
        ("tiny", "train.dist_timeout_s=0", "dist_timeout_s 0.0 is invalid"),
        ("tiny", "diffusion.min_snr_gamma=-1", "min_snr_gamma -1.0 is invalid; expected a finite number > 0"),
        ("tiny", "diffusion.min_snr_gamma=0", "min_snr_gamma 0.0 is invalid"),
        ("tiny", f"diffusion.timesteps={10**9}", f"timesteps {10**9} is invalid; expected an integer in [2, 100000]"),
        ("tiny", "diffusion.timesteps=1", "timesteps 1 is invalid"),
        ("tiny", "diffusion.schedule=cosin", "unknown schedule 'cosin'"),
        ("tiny", "sample.cfg_scale=-1e30", "guidance scale -1e+30 is invalid; expected a finite number in [0, 100]"),
        ("tiny", "sample.cfg_scale=inf", "guidance scale inf is invalid"),
        ("tiny", "sample.steps=0", "sampling steps 0 is invalid"),
        ("tiny", "sample.steps=5000", "sample.steps 5000 is invalid; expected at most diffusion.timesteps (1000)"),
        ("tiny", "sample.grid=0", "sample grid 0 is invalid"),
        ("tiny", "cond_drop=nan", "cond_drop nan is invalid"),
        ("tiny", "cond_drop=1", "cond_drop 1.0 is invalid"),
        ("tiny", "data.seed=-1", "seed -1 is invalid"),
        ("tiny", "data.n=0", "n 0 is invalid"),
        ("tiny", "data.image_size=32", "data.image_size 32 does not match world 'tiny' (16px)"),
        ("vae_tiny", "vae.norm_groups=0", "norm_groups 0 is invalid"),
        ("vae_tiny", f"vae.downsample_factor={2**70}", f"downsample_factor {2**70} is invalid"),
        ("vae_tiny", "vae.heads=0", "heads 0 is invalid"),
        ("vae_tiny", "loss.kl_weight=nan", "kl_weight nan is invalid"),
        ("vae_tiny", "loss.disc_channels=12", "disc_channels 12 is invalid; expected a multiple of 8"),
        ("vae_tiny", "loss.gan_start=-1", "gan_start -1 is invalid"),
        ("vae_tiny", "latent_stats_n=1", "latent_stats_n 1 is invalid"),
        ("clip_tiny", "vision.mlp_ratio=1e30", "mlp_ratio 1e+30 is invalid; expected a finite number in (0, 64]"),
        ("clip_tiny", "text.heads=0", "heads 0 is invalid"),
        ("clip_tiny", "init_temperature=0", "init_temperature 0.0 is invalid"),
        ("clip_tiny", "max_logit_scale=inf", "max_logit_scale inf is invalid"),
        ("clip_tiny", "embed_dim=0", "embed_dim 0 is invalid"),
        ("clip_tiny", "data.describe_prob=nan", "describe_prob nan is invalid"),
        ("planner_tiny", "heads=0", "heads 0 is invalid"),
        ("planner_tiny", "data.short_prob=nan", "short_prob nan is invalid"),
        ("t2i_tiny", "text_layers=", "text_layers () is invalid"),
        ("t2i_tiny", "text_refiner_layers=-1", "text_refiner_layers -1 is invalid"),
        ("t2i_tiny", "attention_loss_weight=inf", "attention_loss_weight inf is invalid"),
        ("t2i_tiny", "latent_scale=0", "latent_scale 0.0 is invalid"),
        ("t2i_mmdit_tiny", "mmdit.mlp_ratio=inf", "mlp_ratio inf is invalid"),
        ("ldm_tiny", "latent_scale=nan", "latent_scale nan is invalid"),
    ],
)  # fmt: skip
def test_out_of_range_set_is_refused_before_training(preset, override, named, tmp_path, capsys):
    out = tmp_path / "run"
    err = refused(["train", "--preset", preset, "--out", str(out), "--set", "train.steps=2", "--set", override],
                  capsys)  # fmt: skip
    assert err.startswith("difflab: error: ") and named in err
    assert override.split("=")[0] in err  # the dotted key, besides the field's own message
    assert not out.exists()  # refused before any work


def test_overrides_of_one_config_are_checked_together_whatever_their_order():
    """A check across fields sees the final values: setting the world before its image size is fine."""
    cfg = apply_overrides(get_preset("demo").build(), ["data.world=tiny", "data.image_size=16"])
    assert (cfg.data.world, cfg.data.image_size) == ("tiny", 16)
    cfg = apply_overrides(
        get_preset("tiny").build(), ["unet.heads=3", "unet.channels=24", "unet.norm_groups=4"]
    )
    assert (cfg.unet.heads, cfg.unet.channels) == (3, 24)
    with pytest.raises(DifflabError, match=r"config keys 'unet.heads=3', 'unet.channels=16' are invalid"):
        apply_overrides(get_preset("tiny").build(), ["unet.heads=3", "unet.channels=16"])
    with pytest.raises(DifflabError, match="heads 3 does not divide the middle attention width"):
        apply_overrides(get_preset("vae_tiny").build(), ["vae.heads=3", "vae.mid_attention=true"])


def _scalar_keys(cls) -> dict[str, type]:
    """Every dotted key of a config class whose (non-optional) type is int or float."""
    out = {}
    for key in valid_keys(cls):
        tp = cls
        for name in key.split("."):
            tp = typing.get_type_hints(tp)[name]
        tp, _ = _strip_optional(tp)
        if tp in (int, float):
            out[key] = tp
    return out


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_numeric_key_has_a_range(preset):
    """Systematic, over every config class a preset is built from: nan and inf are refused for every float
    key, 2**70 and -2**70 for every int key, each as a DifflabError naming the key."""
    family = get_family(get_preset(preset).family)
    request = get_preset(preset).build()
    for key, tp in _scalar_keys(family.config).items():
        values = ("nan", "inf", "-inf") if tp is float else (str(2**70), str(-(2**70)))
        for value in values:
            with pytest.raises(DifflabError, match=re.escape(f"config key '{key}={value}'")):
                apply_overrides(request, [f"{key}={value}"])


# --------------------------------------------------------------------------------------- config.json


def _run_with(tmp_path, path: str, value) -> str:
    """A tiny pixel run directory whose config.json has ``value`` at the dotted ``path``."""
    data = to_dict(pixel.resolve(get_preset("tiny").build()))
    *groups, last = path.split(".")
    node = data
    for g in groups:
        node = node[g]
    node[last] = value
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(data))
    return str(run)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("train.lr", "abc", "config.json: train.lr is 'abc' (str); expected a finite float"),
        ("unet", None, "config.json: unet is null; expected an object of UNetConfig keys"),
        ("unet", [1, 2], "config.json: unet is [1, 2] (list); expected an object of UNetConfig keys"),
        ("train.steps", [1, 2], "config.json: train.steps is [1, 2] (list); expected an integer"),
        ("train.steps", True, "config.json: train.steps is True (bool); expected an integer"),
        ("train.steps", 2.5, "config.json: train.steps is 2.5 (float); expected an integer"),
        ("train.steps", 2**70, "config.json: train.steps is 1180591620717411303424 (int); expected an integer"),
        ("train.betas", [0.9], "config.json: train.betas is [0.9] (list); expected a list of 2 finite floats"),
        ("train.betas", [0.9, "x"], "config.json: train.betas is [0.9, 'x'] (list); expected a list of 2"),
        ("unet.channel_mult", "1,2", "config.json: unet.channel_mult is '1,2' (str); expected a list of integers"),
        ("train.grad_clip", "1", "config.json: train.grad_clip is '1' (str); expected a finite float or null"),
        ("sample.cfg_scale", math.nan, "config.json: sample.cfg_scale is nan (float); expected a finite float"),
        ("train.ema_warmup", 1, "config.json: train.ema_warmup is 1 (int); expected true or false"),
        ("train.lr", -1.0, "config.json: train.lr -1.0 is invalid; expected a finite number > 0"),
        ("unet.channels", 0, "config.json: unet.channels 0 is invalid"),
        ("data.seed", -5, "config.json: data.seed -5 is invalid"),
        ("cond_drop", 1.5, "config.json: cond_drop 1.5 is invalid"),
        ("train.bogus", 1, "config.json has unknown keys ['bogus'] for TrainConfig (at train)"),
    ],
)  # fmt: skip
def test_hand_edited_config_json_is_refused_by_key(path, value, message, tmp_path, capsys):
    run = _run_with(tmp_path, path, value)
    assert message in refused(["sample", run, "--n", "1"], capsys)


def test_from_dict_converts_what_json_cannot_spell():
    cfg = pixel.resolve(get_preset("tiny").build())
    data = json.loads(json.dumps(to_dict(cfg)))  # tuples -> lists
    data["train"]["lr"] = 1  # an int where a float is declared
    loaded = from_dict(type(cfg), data)
    assert loaded.train.lr == 1.0 and isinstance(loaded.train.lr, float)
    assert loaded.unet.channel_mult == cfg.unet.channel_mult and isinstance(loaded.unet.channel_mult, tuple)


# ------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "argv, named",
    [
        (["sample", "RUN", "--cfg", "nan"], "argument --cfg: nan is invalid; expected a finite number in [0, 100]"),
        (["sample", "RUN", "--cfg", "inf"], "argument --cfg: inf is invalid"),
        (["sample", "RUN", "--cfg=-1e30"], "argument --cfg: -1e+30 is invalid"),
        (["sample", "RUN", "--cfg", "abc"], "argument --cfg: 'abc' is not a number"),
        (["sample", "RUN", "--steps", "0"], "argument --steps: 0 is invalid; expected an integer in [1, 100000]"),
        (["sample", "RUN", "--steps", "1.5"], "argument --steps: '1.5' is not an integer"),
        (["sample", "RUN", "--sampler", ""], "argument --sampler: unknown sampler ''; choose one of: ddpm"),
        (["sample", "RUN", "--sampler", "heunn"], "unknown sampler 'heunn' (did you mean 'heun'?)"),
        (["sample", "RUN", "--seed", str(2**70)], f"--seed: {2**70} is invalid; expected an integer in [0, 2**63)"),
        (["sample", "RUN", "--seed", "-1"], "argument --seed: -1 is invalid"),
        (["sample", "RUN", "--n", "0"], "argument --n: 0 is invalid"),
        (["sample", "RUN", "--n", str(2**70)], "argument --n: 1180591620717411303424 is invalid"),
        (["sample", "RUN", "--class", "-1"], "argument --class: -1 is invalid"),
        (["generate", "RUN", "a red circle", "--cfg", "nan"], "argument --cfg: nan is invalid"),
        (["generate", "RUN", "a red circle", "--steps", "0"], "argument --steps: 0 is invalid"),
        (["generate", "RUN", "a red circle", "--sampler", ""], "argument --sampler: unknown sampler ''"),
        (["generate", "RUN", "a red circle", "--seed", str(2**70)], "argument --seed: 1180591620717411303424"),
        (["generate", "RUN", "a red circle", "--n", "0"], "argument --n: 0 is invalid"),
        (["eval", "RUN", "--cfg", "nan"], "argument --cfg: nan is invalid"),
        (["eval", "RUN", "--steps", "0"], "argument --steps: 0 is invalid"),
        (["eval", "RUN", "--sampler", ""], "argument --sampler: unknown sampler ''"),
        (["eval", "RUN", "--seed", "-1"], "argument --seed: -1 is invalid"),
        (["eval", "RUN", "--prompt-seed", str(2**70)], "argument --prompt-seed: 1180591620717411303424"),
        (["eval", "RUN", "--n", "0"], "argument --n: 0 is invalid"),
        (["eval", "RUN", "--temperature", "0"], "argument --temperature: 0.0 is invalid; expected a finite number"),
        (["eval", "RUN", "--temperature", "nan"], "argument --temperature: nan is invalid"),
        (["world", "check", "--noise", "nan"], "--noise nan is invalid; expected a standard deviation in [0, 10]"),
        (["world", "check", "--noise", "inf"], "--noise inf is invalid"),
        (["world", "check", "--n", str(2**70)], "--n 1180591620717411303424 is invalid"),
        (["world", "check", "--seed", "-1"], "argument --seed: -1 is invalid"),
        (["world", "preview", "--seed", str(2**70)], "argument --seed: 1180591620717411303424 is invalid"),
        (["world", "preview", "--n", "0"], "--n 0 is invalid"),
        (["schedule", "--timesteps", str(10**9)], f"--timesteps: {10**9} is invalid; expected an integer in [2,"),
        (["schedule", "--timesteps", "1"], "argument --timesteps: 1 is invalid"),
        (["schedule", "--beta-start", "nan"], "--beta-start: nan is invalid; expected a finite number in (0, 1]"),
        (["schedule", "--beta-end", "2"], "argument --beta-end: 2.0 is invalid"),
        (["schedule", "--beta-end", "0"], "argument --beta-end: 0.0 is invalid"),
        (["schedule", "--plot", "PLOT", "--compare", "linear,cosin"], "unknown schedule 'cosin'"),
        (["demo", "--n", str(2**70)], "argument --n: 1180591620717411303424 is invalid; expected an integer <= 100000"),
        (["demo", "--seed", "-1"], "argument --seed: -1 is invalid"),
        (["demo", "--n", "0"], "--n 0 is invalid"),
    ],
)  # fmt: skip
def test_bad_flags_are_refused_before_any_work(argv, named, tmp_path, capsys):
    run = tmp_path / "run"  # never created: a flag is refused before the run is even looked for
    argv = [str(run) if a == "RUN" else str(tmp_path / "plot.png") if a == "PLOT" else a for a in argv]
    if argv[0] == "demo":
        argv += ["--out", str(tmp_path / "demo")]
    err = refused(argv, capsys)
    assert named in err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "plot.png").exists()


def test_schedule_refuses_a_billion_timesteps_at_once(capsys):
    """It used to build the schedule first, growing past 17 GB."""
    assert "--timesteps" in refused(["schedule", "--timesteps", "1000000000"], capsys)


# --------------------------------------------------------------------------------- generated cases

_VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "4", "8", "16", "32", "-1", "-8", "0.5", "0.999", "1.5", "1e-3", "-0.5",
                     "1e30", "-1e30", "nan", "inf", "-inf", str(2**70), str(-(2**70)), "", " ", "abc", "1,2",
                     "2,2", "8,4", "1,2,2", "0,1", "-1", "0,-1", "none", "null", "true", "false", "cosine",
                     "ddim", "tiny", "scene32", "digits", "red circle"]),
    st.integers(-3, 40).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
)  # fmt: skip


@st.composite
def _requests(draw):
    preset = draw(st.sampled_from(TINY_PRESETS))
    keys = [k for k in valid_keys(get_family(get_preset(preset).family).config)
            if k not in ("kind", "vae", "text_encoder", "planner", "data.folder", "train.device")]  # fmt: skip
    pairs = draw(st.lists(st.tuples(st.sampled_from(keys), _VALUES), min_size=1, max_size=3))
    return preset, [f"{k}={v}" for k, v in pairs]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_generated_overrides_build_a_network_or_are_refused(request):
    """Any --set on a tiny preset either raises DifflabError or gives a record whose network builds, as
    ``difflab info`` builds it (the parent runs it names aside: those are read from disk)."""
    preset, overrides = request
    family = get_family(get_preset(preset).family)
    try:
        cfg = family.resolve(apply_overrides(get_preset(preset).build(), overrides), attach=False)
    except DifflabError:
        return
    model, inputs, _ = family.network(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def _paths(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _paths(v, f"{prefix}{k}.")
    return out


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(TINY_PRESETS), st.data())
def test_generated_config_json_values_load_or_are_refused(preset, data):
    family = get_family(get_preset(preset).family)
    saved = to_dict(family.resolve(get_preset(preset).build(), attach=False))
    path = data.draw(st.sampled_from(_paths(saved)))
    value = data.draw(_JSON)
    *groups, last = path.split(".")
    node = saved
    for g in groups:
        node = node[g]
    node[last] = value
    try:
        from_dict(family.config, json.loads(json.dumps(saved)))
    except DifflabError:
        pass
