"""The trainer: exact resume, NaN stop, resume checks, sampling hook, schedule applied, metrics log."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from difflab.config import apply_overrides, from_dict, to_dict
from difflab.errors import DifflabError
from difflab.train import (
    TrainConfig,
    Trainer,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    lr_factor,
    make_loader,
    read_metrics,
)


class PointsDataset(torch.utils.data.Dataset):
    """Fixed random 4-d points; item i is a dict like the real datasets return."""

    def __init__(self, n: int = 50):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]}


def make_model(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    # Dropout draws from the global RNG: an exact resume must restore that too.
    return nn.Sequential(nn.Linear(4, width), nn.GELU(), nn.Dropout(0.2), nn.Linear(width, 4))


def denoise_loss(model, batch, generator):
    """A toy denoising loss using the trainer's generator for noise and a per-item 'timestep'."""
    x = batch["x"]
    t = torch.rand(x.shape[0], 1, generator=generator, device=x.device)
    noisy = x + t * torch.randn(x.shape, generator=generator, device=x.device)
    loss = ((model(noisy) - x) ** 2).mean()
    return loss, {"t_mean": t.mean()}


CFG = TrainConfig(
    steps=20,
    batch_size=8,
    grad_accum=2,
    lr=1e-2,
    weight_decay=0.01,
    warmup_steps=3,
    lr_schedule="cosine",
    grad_clip=0.5,
    ema_decay=0.9,
    log_every=1,
    checkpoint_every=5,
    keep_last=2,
    device="cpu",
    progress=False,
)


def make_trainer(run_dir, cfg=CFG, loss_fn=denoise_loss, model_seed=0, **kwargs):
    model = make_model(model_seed, width=kwargs.pop("width", 16))
    data = make_loader(PointsDataset(), cfg)
    return Trainer(
        model, loss_fn, data, cfg, run_dir, model_config=kwargs.pop("model_config", None), **kwargs
    )


def assert_same_state(a: Trainer, b: Trainer):
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), name
    for name, t in a.ema.model.state_dict().items():
        assert torch.equal(t, b.ema.model.state_dict()[name]), f"ema {name}"
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for index, slots in sa["state"].items():
        for key, t in slots.items():
            assert torch.equal(t, sb["state"][index][key]), (index, key)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert a.data.state_dict() == b.data.state_dict()


def test_crash_and_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.fit()

    calls = {"n": 0}

    def crashing_loss(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 2 * 13 + 1:  # first micro-batch of step 14; checkpoints exist at 5 and 10
            raise RuntimeError("simulated crash")
        return denoise_loss(model, batch, generator)

    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path / "resumed", loss_fn=crashing_loss).fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [5, 10]
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == list(range(1, 14))

    # A new process: another random init, which the checkpoint must fully overwrite.
    resumed = make_trainer(tmp_path / "resumed", model_seed=123)
    resumed.fit(resume=True)
    assert resumed.step == straight.step == 20
    assert_same_state(straight, resumed)

    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 21))  # steps 11-13 of the crashed run were dropped
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["t_mean"] for r in a] == [r["t_mean"] for r in b]
    assert {"step", "loss", "lr", "grad_norm", "seconds", "items_per_s"} <= set(a[0])
    assert a[0]["items_per_s"] > 0 and b[-1]["seconds"] >= b[0]["seconds"]
    # The learning rate of step s (1-based) is lr * f(s - 1), the closed form in schedule.py.
    for r in a:
        f = lr_factor(r["step"] - 1, warmup_steps=3, total_steps=20, schedule="cosine")
        assert r["lr"] == pytest.approx(CFG.lr * f, rel=1e-12)


def test_resume_at_the_end_does_nothing_and_weights_load_for_sampling(tmp_path):
    t = make_trainer(tmp_path, cfg=dataclasses.replace(CFG, steps=6, grad_accum=1))
    t.fit()
    again = make_trainer(tmp_path, cfg=dataclasses.replace(CFG, steps=6, grad_accum=1), model_seed=7)
    assert again.fit(resume=True) is None and again.step == 6
    fresh = make_model(seed=99)
    load_model_weights(latest_checkpoint(tmp_path / "checkpoints"), fresh)
    for name, w in t.ema.model.state_dict().items():
        assert torch.equal(w, fresh.state_dict()[name])


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_at_step_7(model, batch, generator):
        calls["n"] += 1
        loss, metrics = denoise_loss(model, batch, generator)
        return (loss * math.nan if calls["n"] == 7 else loss), metrics

    cfg = dataclasses.replace(CFG, grad_accum=1, checkpoint_every=2, keep_last=10)
    with pytest.raises(DifflabError, match=r"loss is nan at step 7\b.*step_0000006"):
        make_trainer(tmp_path, cfg=cfg, loss_fn=nan_at_step_7).fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4, 6]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000006"


def test_resume_refuses_a_changed_model_config_or_run_defining_key(tmp_path):
    cfg = dataclasses.replace(CFG, steps=4, grad_accum=1)
    make_trainer(tmp_path, cfg=cfg, model_config={"width": 16, "depth": 2}).fit()
    with pytest.raises(DifflabError, match=r"model config key 'width' was 16, now 32"):
        make_trainer(tmp_path, cfg=cfg, width=32, model_config={"width": 32, "depth": 2}).fit(resume=True)
    # A key the checkpoint predates (an option added to the code since) resumes while it is off...
    for off in (None, False, ()):
        make_trainer(tmp_path, cfg=cfg, model_config={"width": 16, "depth": 2, "new_option": off}).fit(
            resume=True
        )
    # ... and is refused when it is on, since the checkpoint's network never had it.
    with pytest.raises(DifflabError, match=r"model config key 'new_option' was '<absent>', now True"):
        make_trainer(tmp_path, cfg=cfg, model_config={"width": 16, "depth": 2, "new_option": True}).fit(
            resume=True
        )
    # Without a model config, the weight shapes themselves are checked.
    with pytest.raises(
        DifflabError, match=r"weight '0.weight' has shape \(16, 4\), the model expects \(32, 4\)"
    ):
        make_trainer(tmp_path, cfg=cfg, width=32).fit(resume=True)
    with pytest.raises(DifflabError, match="train config key 'batch_size' was 8, now 4"):
        make_trainer(tmp_path, cfg=dataclasses.replace(cfg, batch_size=4)).fit(resume=True)
    # More steps is an ordinary change: the run simply continues.
    longer = make_trainer(
        tmp_path, cfg=dataclasses.replace(cfg, steps=6), model_config={"width": 16, "depth": 2}
    )
    longer.fit(resume=True)
    assert longer.step == 6


def test_fresh_fit_refuses_a_run_dir_with_checkpoints(tmp_path):
    cfg = dataclasses.replace(CFG, steps=2, grad_accum=1)
    make_trainer(tmp_path, cfg=cfg).fit()
    with pytest.raises(DifflabError, match="already has checkpoints.*step_0000002.*--resume"):
        make_trainer(tmp_path, cfg=cfg).fit()


def test_sample_fn_sees_the_ema_model_and_never_disturbs_the_run(tmp_path):
    calls = []

    def sample_fn(model, step, run_dir):
        calls.append((step, model.training, torch.is_grad_enabled()))
        torch.randn(100)  # draws from the global RNG, which the trainer must restore
        (run_dir / f"sample_{step}.txt").write_text("grid")

    cfg = dataclasses.replace(CFG, steps=7, grad_accum=1, sample_every=3)
    with_samples = make_trainer(tmp_path / "a", cfg=cfg, sample_fn=sample_fn)
    with_samples.fit()
    assert calls == [(3, False, False), (6, False, False), (7, False, False)]
    assert (tmp_path / "a" / "sample_7.txt").exists()
    without = make_trainer(tmp_path / "b", cfg=cfg)
    without.fit()
    assert_same_state(with_samples, without)


def test_grad_clip_bounds_the_update_and_frozen_params_stay(tmp_path):
    model = make_model()
    model[0].requires_grad_(False)
    before = model[0].weight.clone()
    cfg = dataclasses.replace(CFG, steps=3, grad_accum=1, grad_clip=1e-3, ema_decay=None)
    seen = []

    def loss_fn(model, batch, generator):
        loss = 1e3 * model(batch["x"]).pow(2).mean()
        return loss, {}

    t = Trainer(model, loss_fn, make_loader(PointsDataset(), cfg), cfg, tmp_path)
    t.fit()
    assert torch.equal(model[0].weight, before)
    assert t.ema is None and t.sampling_model is model
    for p in model[3].parameters():
        seen.append(p.grad.norm().item())
    assert math.sqrt(sum(g * g for g in seen)) <= 1e-3 * (1 + 1e-5)


def test_train_config_validates_and_round_trips():
    with pytest.raises(DifflabError, match="unknown lr schedule 'cosin' \\(did you mean 'cosine'\\?\\)"):
        TrainConfig(lr_schedule="cosin")
    with pytest.raises(DifflabError, match="bad ema_decay 1.5"):
        TrainConfig(ema_decay=1.5)
    with pytest.raises(DifflabError, match="bad grad_clip 0"):
        TrainConfig(grad_clip=0)
    cfg = apply_overrides(TrainConfig(), ["grad_clip=none", "betas=0.9,0.95", "lr_schedule=cosine"])
    assert cfg.grad_clip is None and cfg.betas == (0.9, 0.95)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_grad_accum_of_two_half_batches_equals_one_full_batch(tmp_path):
    def mse(model, batch, generator):
        return ((model(batch["x"]) - batch["x"]) ** 2).mean()

    weights = []
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        cfg = dataclasses.replace(CFG, steps=3, batch_size=batch_size, grad_accum=grad_accum, ema_decay=None)
        model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4)).double()
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
        data = make_loader(torch.utils.data.TensorDataset(PointsDataset().x.double()), cfg)
        Trainer(model, mse, ({"x": b[0]} for b in data), cfg, tmp_path / str(grad_accum)).fit()
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-12, atol=1e-12)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    cfg = dataclasses.replace(CFG, steps=2, grad_accum=1, mixed_precision="bf16")
    record = make_trainer(tmp_path, cfg=cfg).fit()
    assert record["step"] == 2 and math.isfinite(record["loss"])


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real crash: ``difflab train`` in a subprocess is killed with SIGKILL (no cleanup, maybe mid-save)
    at a random step; ``--resume`` then ends with every tensor of the final checkpoint (weights, EMA,
    AdamW moments, RNG states) bitwise equal to an uninterrupted run's."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    steps = 60
    kill_at = random.randint(12, steps - 12)
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def train(out, *extra):
        args = ["--preset", "tiny", "--out", str(out), "--device", "cpu", "--set", f"train.steps={steps}",
                "--set", "train.checkpoint_every=10", "--set", "train.log_every=1", *extra]  # fmt: skip
        return subprocess.Popen([sys.executable, "-m", "difflab", "train", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    assert train(tmp_path / "straight").wait(timeout=300) == 0
    crashed = train(tmp_path / "crashed")
    metrics = tmp_path / "crashed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while crashed.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_at:
            crashed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert crashed.wait(timeout=60) == -signal.SIGKILL, f"the run ended before step {kill_at}"
    done = [s for s, _ in list_checkpoints(tmp_path / "crashed" / "checkpoints")]
    assert done and done[-1] < steps, (kill_at, done)

    resumed = train(tmp_path / "crashed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = load_file(str(tmp_path / "straight" / "checkpoints" / f"step_{steps:07d}" / "state.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "checkpoints" / f"step_{steps:07d}" / "state.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"killed at step {kill_at} (checkpoints {done}): {different[:5]}"


def test_fp16_loss_scaling_skips_an_overflowing_step_and_its_scale_resumes(tmp_path):
    """fp16 autocast with a dynamic loss scaler (torch.amp.GradScaler): a step whose gradients are not
    finite is skipped (weights unchanged, scale halved, training goes on) instead of stopping the run as
    it does in fp32; the scaler's state is in the checkpoint."""
    calls = {"n": 0}

    def loss_with_one_bad_step(model, batch, generator):
        calls["n"] += 1
        loss = ((model(batch["x"]) - batch["x"]) ** 2).mean()
        if calls["n"] == 3:  # a finite loss whose gradient is NaN: d sqrt(u) / du at u = 0, times 0
            loss = loss + (model[0].weight.abs().sum() * 0).sqrt()
        return loss

    cfg = dataclasses.replace(CFG, steps=4, grad_accum=1, ema_decay=None, mixed_precision="fp16")
    trainer = make_trainer(tmp_path / "fp16", cfg=cfg, loss_fn=loss_with_one_bad_step)
    trainer._start_fresh()
    for _ in range(2):
        trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    scale = trainer.scaler.get_scale()
    out = trainer.train_step()
    assert not math.isfinite(out["grad_norm"]) and trainer.step == 3
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    assert trainer.scaler.get_scale() == scale / 2
    trainer.train_step()
    path = trainer.save_checkpoint()
    again = make_trainer(tmp_path / "fp16", cfg=cfg)
    again.load_checkpoint(path)
    assert again.scaler.state_dict() == trainer.scaler.state_dict()

    calls["n"] = 0  # in fp32 the same step is a fault that stops the run, naming it
    cfg32 = dataclasses.replace(cfg, mixed_precision="no")
    with pytest.raises(DifflabError, match="gradient norm is nan at step 3"):
        make_trainer(tmp_path / "fp32", cfg=cfg32, loss_fn=loss_with_one_bad_step).fit()


def test_compile_keeps_parameter_names_and_trains(tmp_path):
    """``train.compile`` compiles the model in place, so checkpoints keep their parameter names. The
    'eager' backend traces with TorchDynamo without generating code: a quick check on a 2-core CI."""
    cfg = dataclasses.replace(CFG, steps=3, grad_accum=1, compile="eager")
    trainer = make_trainer(tmp_path, cfg=cfg)
    names = set(trainer.model.state_dict())
    record = trainer.fit()
    assert record["step"] == 3 and math.isfinite(record["loss"])
    assert set(trainer.model.state_dict()) == names
    fresh = make_trainer(tmp_path / "plain", cfg=dataclasses.replace(cfg, compile="no"))
    load_model_weights(latest_checkpoint(tmp_path / "checkpoints"), fresh.model, ema=False)
    with pytest.raises(DifflabError, match="unknown compile mode 'inductr'.*did you mean 'inductor'"):
        dataclasses.replace(cfg, compile="inductr")


def test_channels_last_trains_the_same_network_and_saves_plain_checkpoints(tmp_path):
    """``train.channels_last`` changes only the memory order of 4-D weights: 3 steps of the tiny UNet end
    where the default layout ends (to float rounding of other kernels), and the checkpoint loads into a
    model in the default layout."""
    from difflab.config import apply_overrides
    from difflab.models import pixel
    from difflab.models.registry import get_preset
    from difflab.nn.unet import UNet

    finals = []
    for layout in ("false", "true"):
        keys = ["train.steps=3", f"train.channels_last={layout}", "train.device=cpu", "sample.grid=4"]
        cfg = pixel.resolve(apply_overrides(get_preset("tiny").build(), keys))
        run = pixel.train(cfg, tmp_path / layout)
        model = UNet(cfg.unet)
        load_model_weights(latest_checkpoint(run / "checkpoints"), model, ema=False)
        assert model.conv_in.weight.is_contiguous()
        finals.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)
