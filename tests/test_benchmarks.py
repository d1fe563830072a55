"""Smoke tests: every benchmark script runs end to end with its smallest setting and prints what its
docs say it prints. They assert structure, never speed (speed lives in docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# Each benchmark script end to end at its smallest setting: minutes together, so they run in .ci/run's
# second pass (pytest -m slow), beside the default suite.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True,
                          text=True, timeout=300, check=True)  # fmt: skip


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("variant", ["demo", "diffusers_naive"])
def test_pixel_learning_smallest_setting(variant):
    """Two training steps on digits, one evaluation of one sample per class, then the summary table."""
    out = run_script("pixel_learning.py", "--preset", "digits", "--variants", variant, "--minutes", "0",
                     "--eval-every", "2", "--per-class", "1")  # fmt: skip
    header, record = json_lines(out.stdout)
    assert {"machine", "threads", "torch", "date"} <= set(header)
    assert record["variant"] == variant and record["step"] == 2 and record["n"] == 10
    assert 0.0 <= record["class_accuracy"] <= 1.0 and 0.0 <= record["class_accuracy_cfg1"] <= 1.0
    assert f"| {variant} |" in out.stderr


def test_sampler_convergence_smallest_setting():
    out = run_script("sampler_convergence.py", "--steps", "5,10", "--spacings", "trailing")
    result = json_lines(out.stdout)[0]
    assert "trailing" in json.dumps(result) and "| ddim |" in out.stdout.replace("`", "")


def test_world_throughput_smallest_setting():
    out = run_script("world_throughput.py", "--n", "16", "--batch-size", "8", "--workers", "0")
    result = json.loads(out.stdout[out.stdout.index("{") :])
    assert set(result["presets"]) >= {"single32", "scene32", "scene64"}
    assert all(p["render_scenes_per_s"] > 0 for p in result["presets"].values())


def test_train_throughput_smallest_setting():
    out = run_script("train_throughput.py", "--cases", "latent8", "--rounds", "1", "--steps", "1")
    result = json.loads(out.stdout)
    (case,) = result["cases"]
    assert result["matmul_fp32_gflop_s"] > 0 and case["case"] == "latent8"
    # the comparison is only meaningful if the two networks are the same size and do the same work
    assert abs(case["parameter_ratio"] - 1) < 0.05
    assert case["difflab"]["gflop_per_step"] == case["diffusers"]["gflop_per_step"]
    assert case["difflab"]["images_per_s"] > 0 and case["diffusers"]["images_per_s"] > 0


def test_unet_defaults_smallest_setting():
    """Every variant but compile (inductor takes a minute to compile; tests/test_train_trainer.py traces
    the compile path with the eager backend), one step of batch 2 per round."""
    variants = "heads4,head_dim32,head_dim64,channels_last"
    out = run_script("unet_defaults.py", "--networks", "demo,t2i_demo", "--variants", variants, "--rounds", "1",
                     "--steps", "1", "--batch", "2")  # fmt: skip
    result = json.loads(out.stdout)
    demo, t2i = result["networks"]["demo"], result["networks"]["t2i_demo"]
    # the same parameters in every variant; the head split follows head_dim (64-wide attention layers)
    assert [v["heads"] for v in demo["variants"].values()] == [[4], [2], [1], [4]]
    assert all(v["images_per_s"] > 0 for r in (demo, t2i) for v in r["variants"].values())
    assert demo["variants"]["heads4"]["vs_heads4"] == 1.0 and t2i["batch"] == 2
    assert "| t2i_demo | channels_last |" in out.stderr


def test_attention_kernels_smallest_setting():
    out = run_script("attention_kernels.py", "--side", "4", "--channels", "16", "--batch", "2", "--heads", "2,1",
                     "--reps", "1")  # fmt: skip
    result = json_lines(out.stdout)[0]
    assert [r["heads"] for r in result["rows"]] == [2, 1] and result["tokens"] == 16
    assert all(r[k] > 0 for r in result["rows"] for k in ("sdpa_flash", "sdpa_math", "textbook"))
    assert "| 2 x 8 |" in out.stdout


def test_ldm_time_to_quality_smallest_setting():
    """f = 4 only: a 2-step autoencoder, 64 encoded images, one evaluation of one sample per class at step 2
    (the target is out of reach, so the table says 'not reached'); then the pixel baseline alone."""
    out = run_script("ldm_time_to_quality.py", "--factors", "4", "--no-pixel", "--minutes", "0", "--eval-every", "2",
                     "--per-class", "1", "--vae-eval-n", "4", "--vae-set", "train.steps=2",
                     "--vae-set", "latent_stats_n=16", "--vae-set", "data.n=64", "--ldm-set", "data.n=64")  # fmt: skip
    header, vae_rec, encode, ldm_rec = json_lines(out.stdout)
    assert {"machine", "threads", "torch", "date"} <= set(header)
    assert vae_rec["phase"] == "vae" and vae_rec["latent_shape"] == [8, 8, 8] and vae_rec["steps"] == 2
    assert encode == {"phase": "encode", "f": 4, "seconds": encode["seconds"], "items": 64}
    assert ldm_rec["phase"] == "ldm" and ldm_rec["step"] == 2 and ldm_rec["n"] == 40
    assert "| latent f=4 |" in out.stdout and "not reached" in out.stdout


def test_t2i_sweep_smallest_setting(tmp_path):
    """One prompt per category, one guidance scale and one sampler setting on a 2-step tiny run."""
    from difflab.config import apply_overrides
    from difflab.models import clip, t2i
    from difflab.models.registry import get_preset

    clip_run = clip.train(
        apply_overrides(get_preset("clip_tiny").build(), ["train.steps=2"]), tmp_path / "clip"
    )
    run = t2i.train(apply_overrides(get_preset("t2i_tiny").build(), [f"text_encoder={clip_run}", "train.steps=2",
                                                                      "sample.grid=2"]), tmp_path / "t2i")  # fmt: skip
    out = run_script("t2i_sweep.py", str(run), "--n", "1", "--cfg", "1,2", "--samplers", "ddim:2")
    header, *records = json_lines(out.stdout)
    assert {"machine", "threads", "torch", "date"} <= set(header)
    assert [(r["sampler"], r["steps"], r["cfg_scale"]) for r in records] == [
        ("ddim", 10, 1.0), ("ddim", 10, 2.0), ("ddim", 2, 2.0)]  # fmt: skip
    assert all(r["n"] == 3 and 0 <= r["overall"] <= 1 for r in records)  # tiny: 3 categories of 1 prompt
    assert "| w = 2 |" in out.stderr and "| ddim 2 |" in out.stderr


def test_sampling_smallest_setting():
    """Two images, two steps, one round of every side (ours, diffusers, our loop around their network)."""
    out = run_script("sampling.py", "--rounds", "1", "--batch", "2", "--steps", "2", "--cases", "latent8")
    result = json.loads(out.stdout)
    assert {"cpu", "threads", "torch", "diffusers"} <= set(result["machine"]) and "date" in result
    assert result["options"]["steps"] == 2 and result["options"]["batch"] == 2
    (case,) = result["cases"]
    assert case["case"] == "latent8" and case["image"] == [4, 8, 8]
    assert abs(case["parameter_ratio"] - 1) < 0.05  # the same network shape on both sides
    for sampler in ("ddim", "dpmpp_2m"):
        row = case[sampler]
        assert all(row[side]["images_per_s"] > 0 for side in ("difflab", "diffusers", "cross"))
        assert all(math.isfinite(row[k]) for k in ("difflab_over_diffusers", "loop_cross_over_diffusers"))
        # the same network, schedule, timesteps and noise through our loop and diffusers': the same samples
        # up to float32 rounding (diffusers' alpha_bar is float32, ours float64)
        assert row["cross_vs_diffusers_max_abs_diff"] <= 1e-5 * max(1.0, row["diffusers_sample_max_abs"])


def test_samplers_smallest_setting(tmp_path):
    """A 2-step vae_tiny and ldm_tiny trained into a temporary cache, then 2 samples of each of the tiny
    world's 4 classes per row, with short step lists; the plot goes to a temporary file."""
    plot = tmp_path / "nfe.png"
    tiny = ["--preset", "ldm_tiny", "--vae-preset", "vae_tiny", "--set", "train.steps=2", "--vae-set", "train.steps=2",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    out = run_script("samplers.py", *tiny, "--per-class", "2", "--ddpm", "10", "--ddim", "2,5", "--dpmpp-2m", "3",
                     "--dpmpp-2m-sde", "3", "--sde-eta", "2", "--sa-solver", "3", "--sa-eta", "0.5", "--euler", "2",
                     "--heun", "3", "--goal-nfe", "5", "--plot", str(plot))  # fmt: skip
    result = json.loads(out.stdout)
    rows = result["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("ddpm", 10), ("ddim", 2), ("ddim", 5), ("dpmpp_2m", 3), ("dpmpp_2m_sde", 3), ("sa_solver", 3),
        ("euler", 2), ("heun", 3)]  # fmt: skip
    assert [r["nfe_nominal"] for r in rows] == [10, 2, 5, 3, 3, 3, 2, 5]
    assert rows[4]["options"] == {"eta": 2.0} and rows[3]["options"] == {}  # --sde-eta reaches the SDE solver
    assert rows[5]["options"] == {"eta": 0.5}  # and --sa-eta SA-Solver
    # counted calls: Heun's first step starts above HEUN_MAX_SIGMA (cosine schedule at t = 999) and takes
    # the Euler step alone, one call fewer than 2 * 3 - 1
    assert [r["nfe"] for r in rows] == [10, 2, 5, 3, 3, 3, 2, 4]
    for r in rows:
        assert r["n"] == r["frechet_n"] == 8 and 0.0 <= r["class_accuracy"] <= 1.0
        assert math.isfinite(r["frechet_distance"]) and r["frechet_distance"] >= 0 and r["seconds"] >= 0
    goal = result["goal"]
    assert goal["checked"] and goal["reference"] == "ddpm 10" and isinstance(goal["met"], bool)
    assert [r["nfe"] for r in goal["rows"]] == [2, 5, 3, 3, 3, 2, 4]
    assert result["model"]["family"] == "ldm" and result["machine"]["threads"] >= 1
    assert plot.stat().st_size > 0 and result["plot"] == str(plot)
    assert "| heun | 3 | 4 (5 nominal) |" in out.stderr and out.stderr.count("training '") == 2
    again = run_script("samplers.py", *tiny, "--per-class", "1", "--ddpm", "", "--ddim", "2", "--dpmpp-2m", "",
                       "--dpmpp-2m-sde", "", "--sa-solver", "", "--euler", "", "--heun", "", "--plot", "")  # fmt: skip
    assert "training '" not in again.stderr  # both runs come from the cache
    assert json.loads(again.stdout)["model"]["run"] == result["model"]["run"]


def test_samplers_on_a_pixel_run(tmp_path):
    """--run: an existing pixel run (tiny, 2 steps) is measured as it is, nothing is trained."""
    from difflab.config import apply_overrides
    from difflab.models import pixel
    from difflab.models.registry import get_preset

    run = pixel.train(apply_overrides(get_preset("tiny").build(), ["train.steps=2"]), tmp_path / "run")
    out = run_script("samplers.py", "--run", str(run), "--per-class", "1", "--ddpm", "4", "--ddim", "2",
                     "--dpmpp-2m", "", "--dpmpp-2m-sde", "", "--sa-solver", "", "--euler", "", "--heun", "",
                     "--goal-nfe", "2", "--plot", "", "--cache-dir", str(tmp_path / "unused"))  # fmt: skip
    result = json.loads(out.stdout)
    assert [(r["sampler"], r["nfe"], r["n"]) for r in result["rows"]] == [("ddpm", 4, 4), ("ddim", 2, 4)]
    assert result["model"]["family"] == "pixel" and result["model"]["run"] == str(run)
    assert "plot" not in result and not (tmp_path / "unused").exists()


def test_step_profile_smallest_setting():
    """One profiled step of each matched latent network: every kind of work gets a share and the shares sum
    to 1. Which share is largest is a timing (docs/benchmarks.md), not asserted here: on a busy machine one
    profiled step can spend more in the optimizer than in the convolutions."""
    out = run_script("step_profile.py", "--case", "latent8", "--warmup", "1", "--steps", "1")
    result = json.loads(out.stdout)
    assert result["case"] == "latent8" and result["machine"]["threads"] >= 1
    for side in ("difflab", "diffusers"):
        shares = result["sides"][side]["shares"]
        assert set(shares) == {"convolution", "matmul", "attention", "normalisation", "activation", "optimizer",
                               "other"}  # fmt: skip
        assert abs(sum(shares.values()) - 1) < 1e-3 and all(v >= 0 for v in shares.values())
        assert all(shares[k] > 0 for k in ("convolution", "matmul", "normalisation", "optimizer")), shares
    assert "| difflab |" in out.stderr and "| diffusers |" in out.stderr


def test_t2i_recipes_smallest_setting(tmp_path):
    """Two recipes on tiny presets (2 training steps each, one prompt per category) over a base of a text
    encoder and a planner: one record per recipe with both prompt sets, the painter's score for the layout
    recipe, and the tables."""
    from difflab.config import apply_overrides
    from difflab.models import clip, planner
    from difflab.models.registry import get_preset

    clip.train(
        apply_overrides(get_preset("clip_tiny").build(), ["train.steps=2"]),
        tmp_path / "base" / "text_encoder",
    )
    base = tmp_path / "base"
    tiny_world = ["data.heldout_pairs=", "data.world=tiny", "train.steps=2"]
    planner.train(apply_overrides(get_preset("planner_tiny").build(), tiny_world), base / "planner")
    settings = ["--n", "1", "--set", "train.steps=2", "--set", "sample.grid=2", "--set", "sample.steps=2"]
    out = run_script("t2i_recipes.py", "--base", str(base), "--out", str(tmp_path / "runs"), "--recipes",
                     "sd=t2i_tiny,layout=t2i_layout_tiny", *settings, "--json", str(tmp_path / "r.json"))  # fmt: skip
    records = json_lines(out.stdout)
    assert [(r["recipe"], r["steps"]) for r in records] == [("sd", 2), ("layout", 2)]
    for r in records:
        assert 0 <= r["shipped"]["overall"] <= 1 and 0 <= r["fresh_1"]["overall"] <= 1
    assert "painter" in records[1]["shipped"] and "painter" not in records[0]["shipped"]
    assert "| layout |" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["records"] == records


def test_vlm_position_smallest_setting(tiny_vlm):
    """The five readings on the tiny LLaVA (one object a scene, so the two-object readings are empty)."""
    out = run_script("vlm_position.py", str(tiny_vlm), "--n", "60").stdout
    assert "position questions by object count:\n  1 object(s): " in out
    assert "ridge probe, visual token -> its index: " in out
    assert "captions: objects named with a shape, and the wrong shapes among them:\n  1 object(s): " in out


def test_vlm_binding_smallest_setting(tiny_vlm):
    """The three binding accuracies of the tiny LLaVA, each a share in [0, 1] over its n cases."""
    out = run_script("vlm_binding.py", str(tiny_vlm), "--n", "40").stdout
    header, row = out.splitlines()
    assert header.split()[:2] == ["run", "swap:"]
    fields = row.split()
    assert fields[0] == str(tiny_vlm) and fields[2] == "(n=20)"
    assert all(0 <= float(x) <= 1 for x in (fields[1], fields[3], fields[4]))
