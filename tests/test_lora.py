"""LoRA (difflab.nn.lora) against PEFT, the independent implementation: with A and B copied across, the same
outputs and the same merged weights; B = 0 is the base; merge then unmerge restores it."""

import copy
import math

import peft  # the independent implementation: a test-only dependency ('.[dev]')
import pytest
import torch

from difflab.errors import DifflabError
from difflab.nn.attention import SpatialAttention
from difflab.nn.lora import (
    ATTENTION_TARGETS,
    CROSS_ATTENTION_KV,
    RESBLOCK_CONVS,
    LoRAConv2d,
    LoRALinear,
    add_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    set_lora_scale,
    unmerge_lora,
)
from difflab.nn.unet import UNet, UNetConfig

CFG = UNetConfig(in_channels=4, out_channels=4, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8, 4), heads=2, norm_groups=4, context_dim=12)  # fmt: skip


def _unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(CFG)
    for p in unet.conv_out.parameters():  # a base whose output is not the fresh UNet's zero
        torch.nn.init.normal_(p)
    return unet.eval()


def _inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(3, 4, 8, 8, generator=g), "t": torch.tensor([1, 400, 999]),
            "context": torch.randn(3, 5, 12, generator=g)}  # fmt: skip


def _randomise(model) -> None:
    """Move every B off zero, so the adapter changes the output."""
    g = torch.Generator().manual_seed(2)
    for m in lora_layers(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def _peft_twin(ours, base, rank: int, alpha: float, rslora: bool = False):
    """PEFT's LoRA on a copy of the same base, with our A and B copied into its lora_A / lora_B."""
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(ATTENTION_TARGETS), use_rslora=rslora
    )
    twin = peft.get_peft_model(copy.deepcopy(base), config)
    for name, layer in lora_layers(ours).items():
        theirs = twin.base_model.model.get_submodule(name)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return twin


@pytest.mark.parametrize(("rank", "alpha", "rslora"), [(4, 8.0, False), (1, 1.0, False), (4, 8.0, True)])
def test_outputs_and_merged_weights_equal_peft(rank, alpha, rslora):
    base = _unet()
    ours = copy.deepcopy(base)
    add_lora(ours, rank, alpha, rslora=rslora)
    _randomise(ours)
    twin = _peft_twin(ours, base, rank, alpha, rslora)
    want = twin(**_inputs())
    got = ours(**_inputs())
    assert not torch.allclose(got, base(**_inputs()), atol=1e-4)  # the adapter does something
    assert torch.allclose(got, want, atol=1e-6)
    # the scaling conventions: alpha / r, or alpha / sqrt(r) for rsLoRA
    name, layer = next(iter(lora_layers(ours).items()))
    assert layer.scaling == twin.base_model.model.get_submodule(name).scaling["default"]
    assert layer.scaling == pytest.approx(alpha / (math.sqrt(rank) if rslora else rank))
    merge_lora(ours)
    merged = twin.merge_and_unload()
    theirs = merged.state_dict()
    for key, value in ours.state_dict().items():
        if "lora_" not in key:
            assert torch.allclose(value, theirs[key.replace(".base.", ".")], atol=1e-6), key
    assert torch.allclose(ours(**_inputs()), want, atol=1e-5)


def test_a_fresh_adapter_is_the_base_bitwise():
    base = _unet()
    ours = copy.deepcopy(base)
    blocks = sum(isinstance(m, SpatialAttention) for m in ours.modules())
    names = add_lora(ours, 4)
    assert len(names) == blocks * 2 * 4  # q, k, v, out of each block's self- and cross-attention
    assert torch.equal(ours(**_inputs()), base(**_inputs()))
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in lora_layers(ours).values())


def test_merge_then_unmerge_restores_the_weights():
    base = _unet()
    ours = copy.deepcopy(base)
    add_lora(ours, 4, 8.0)
    _randomise(ours)
    before = ours(**_inputs())
    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    merge_lora(ours)
    assert torch.allclose(ours(**_inputs()), before, atol=1e-5)  # merged: the same function, one matmul
    unmerge_lora(ours)
    for k, v in ours.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-6), k
    assert torch.allclose(ours(**_inputs()), before, atol=1e-5)


def test_the_base_is_frozen_and_the_adapter_small():
    ours = _unet()
    total = sum(p.numel() for p in ours.parameters())
    add_lora(ours, 1)
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)
    # r (d_in + d_out) per adapted layer: at rank 1 a fiftieth of even this small UNet
    layers = lora_layers(ours).values()
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(m.base.in_features + m.base.out_features for m in layers) and count <= 0.02 * total
    assert set(lora_state_dict(ours)) == {f"{n}.{k}" for n in lora_layers(ours) for k in ("lora_A", "lora_B")}


def test_the_scale_interpolates_and_zero_is_the_base():
    base = _unet()
    ours = copy.deepcopy(base)
    add_lora(ours, 4)
    _randomise(ours)
    set_lora_scale(ours, 0.0)
    assert torch.equal(ours(**_inputs()), base(**_inputs()))
    layer = next(iter(lora_layers(ours).values()))
    x = torch.randn(5, layer.base.in_features)
    set_lora_scale(ours, 0.5)
    half = layer(x) - layer.base(x)
    set_lora_scale(ours, 1.0)
    assert torch.allclose(2 * half, layer(x) - layer.base(x), atol=1e-6)


def test_initialisation_matches_peft():
    """A: Kaiming-uniform with a = sqrt(5) (bound 1 / sqrt(d_in)), B: zeros, as PEFT's default."""
    layer = LoRALinear(torch.nn.Linear(64, 32), 8, 8)
    twin = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(64, 32)), peft.LoraConfig(r=8, target_modules=["0"])
    )
    theirs = twin.base_model.model[0].lora_A["default"].weight
    bound = 1 / math.sqrt(64)
    assert layer.lora_A.abs().max() <= bound and theirs.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(theirs.std().item(), rel=0.15)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_bad_ranks_and_targets_are_named():
    with pytest.raises(DifflabError, match="rank 0"):
        LoRALinear(torch.nn.Linear(8, 8), 0, 1)
    with pytest.raises(DifflabError, match="rank 9"):
        LoRALinear(torch.nn.Linear(8, 8), 9, 1)
    with pytest.raises(DifflabError, match="to_qq"):
        add_lora(_unet(), 2, targets=("to_qq",))
    ours = _unet()
    add_lora(ours, 2)
    merge_lora(ours)
    with pytest.raises(DifflabError, match="merged"):
        set_lora_scale(ours, 0.5)


def test_a_dotted_target_picks_cross_attention_alone():
    """'cross_attn.to_k' matches the end of a layer's qualified name, as PEFT's target_modules do."""
    unet = _unet()
    names = add_lora(unet, 2, targets=CROSS_ATTENTION_KV)
    assert names and all(n.endswith(("cross_attn.to_k", "cross_attn.to_v")) for n in names)
    assert len(names) == 2 * sum(n.endswith("cross_attn") for n, _ in unet.named_modules())


@pytest.mark.parametrize("rslora", [False, True])
def test_convolution_lora_equals_peft(rslora):
    """LoCon: A a 3x3 convolution into r channels, B a 1x1 one out of them, as PEFT's Conv2d LoRA; merged, one
    kernel of the base's shape."""
    base = _unet()
    ours = copy.deepcopy(base)
    names = add_lora(ours, 2, 4.0, targets=RESBLOCK_CONVS, rslora=rslora)
    assert names and all(isinstance(m, LoRAConv2d) for m in lora_layers(ours).values())
    assert torch.equal(ours(**_inputs()), base(**_inputs()))  # B = 0
    _randomise(ours)
    config = peft.LoraConfig(r=2, lora_alpha=4.0, target_modules=list(RESBLOCK_CONVS), use_rslora=rslora)
    twin = peft.get_peft_model(copy.deepcopy(base), config)
    for name, layer in lora_layers(ours).items():
        theirs = twin.base_model.model.get_submodule(name)
        assert theirs.lora_A["default"].weight.shape == layer.lora_A.shape
        assert theirs.lora_B["default"].weight.shape == layer.lora_B.shape
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    want = twin(**_inputs())
    assert torch.allclose(ours(**_inputs()), want, atol=1e-6)
    merge_lora(ours)
    theirs = twin.merge_and_unload().state_dict()
    for key, value in ours.state_dict().items():
        if "lora_" not in key:
            assert torch.allclose(value, theirs[key.replace(".base.", ".")], atol=1e-6), key
