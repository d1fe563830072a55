"""LR schedule and EMA against their closed forms."""

import math

import pytest
import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.train import EMA, ema_decay_at, lr_factor


def test_warmup_is_linear_then_constant():
    f = [lr_factor(s, warmup_steps=4, total_steps=100) for s in range(7)]
    assert f == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert lr_factor(0, warmup_steps=0, total_steps=10) == 1.0


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_cosine_matches_the_sgdr_formula(min_ratio):
    # W = 10, S = 110: decay spans 100 steps, so p = (s - 10) / 100.
    def f(s):
        return lr_factor(s, warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=min_ratio)

    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)  # cos(pi / 2) = 0
    assert f(35) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(min_ratio) and f(500) == pytest.approx(min_ratio)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_unknown_schedule_names_the_choices():
    with pytest.raises(DifflabError, match="unknown lr schedule 'linear'; choose one of: constant, cosine"):
        lr_factor(0, warmup_steps=0, total_steps=10, schedule="linear")


def scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False).double()
    model.weight.data.fill_(value)
    model.register_buffer("count", torch.tensor(0))
    return model


def run_ema(theta0: float, target: float, decay: float, warmup: bool, k: int) -> float:
    model = scalar_model(theta0)
    ema = EMA(model, decay, warmup=warmup)
    model.weight.data.fill_(target)  # the live weights jump to a constant and stay there
    for _ in range(k):
        ema.update(model)
    return ema.model.weight.item()


def test_ema_constant_decay_closed_form():
    # theta_bar_k = d^k theta_0 + (1 - d^k) c for a live parameter held at c.
    d, k = 0.9, 25
    assert run_ema(2.0, -1.0, d, False, k) == pytest.approx(d**k * 2.0 + (1 - d**k) * -1.0, rel=1e-12)


def test_ema_warmup_closed_form_and_tensorflow_example():
    d, k = 0.99, 40
    decays = [min(d, (1 + i) / (10 + i)) for i in range(k)]
    assert decays == [ema_decay_at(i, d) for i in range(k)]
    prod = math.prod(decays)
    assert run_ema(2.0, -1.0, d, True, k) == pytest.approx(prod * 2.0 + (1 - prod) * -1.0, rel=1e-12)
    # The tf.train.ExponentialMovingAverage docs example: decay 0.99, shadow 0, variable 5 -> 4.5
    # after the first update (d_0 = min(0.99, 1/10) = 0.1).
    assert run_ema(0.0, 5.0, 0.99, True, 1) == pytest.approx(4.5, rel=1e-12)


def test_ema_copies_buffers_and_round_trips():
    model = scalar_model(1.0)
    ema = EMA(model, 0.5, warmup=False)
    model.count.fill_(7)
    ema.update(model)
    assert ema.model.count.item() == 7 and not any(p.requires_grad for p in ema.model.parameters())
    other = EMA(scalar_model(3.0), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.model.weight, ema.model.weight)
