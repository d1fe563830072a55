"""Flamingo's gated cross-attention (difflab.nn.flamingo): closed gates return the input bit for bit, so a
GPT with the Flamingo hook is exactly the plain GPT; open gates let the image in; the hook only acts before
the blocks it was built for."""

import pytest
import torch

from difflab.errors import DifflabError
from difflab.nn.flamingo import FlamingoLayers, GatedCrossAttentionBlock
from difflab.nn.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("single_thread")

D_LM, D_VISUAL, HEADS = 16, 12, 4


def _randn(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _block() -> GatedCrossAttentionBlock:
    torch.manual_seed(0)
    return GatedCrossAttentionBlock(D_LM, D_VISUAL, HEADS)


def test_gated_block_shape():
    block = _block()
    with torch.no_grad():
        block.alpha_xattn.fill_(0.5)
    assert block(_randn(3, 7, D_LM), _randn(3, 5, D_VISUAL, seed=1)).shape == (3, 7, D_LM)


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (1, 1e-3), (2, 1e4), (3, 0.0)])
def test_closed_gates_return_the_input_bitwise(seed, scale):
    """tanh(0) = 0 on both branches: x + 0 * (anything finite) is x, exactly, whatever the other weights."""
    block = _block()
    with torch.no_grad():
        for p in block.parameters():
            if p.ndim:  # every weight but the two scalar gates, far from its initialisation
                p.copy_(_randn(*p.shape, seed=seed + 10))
    x, visual = _randn(2, 9, D_LM, seed=seed, scale=scale), _randn(2, 6, D_VISUAL, seed=seed + 1, scale=scale)
    assert torch.equal(block(x, visual), x)


@pytest.mark.parametrize("gate", ["alpha_xattn", "alpha_dense"])
def test_either_open_gate_changes_the_output(gate):
    block, x, visual = _block(), _randn(2, 9, D_LM), _randn(2, 6, D_VISUAL, seed=1)
    with torch.no_grad():
        getattr(block, gate).fill_(0.5)
    out = block(x, visual)
    assert (out - x).abs().max() > 1e-3
    if gate == "alpha_xattn":  # the image gets in
        assert (out - block(x, _randn(2, 6, D_VISUAL, seed=2))).abs().max() > 1e-3


def test_closed_gates_still_get_a_gradient():
    """d/d alpha of tanh(alpha) X at alpha = 0 is X: training can open a closed gate."""
    block = _block()
    block(_randn(2, 9, D_LM), _randn(2, 6, D_VISUAL, seed=1)).square().sum().backward()
    assert block.alpha_xattn.grad.abs() > 0 and block.alpha_dense.grad.abs() > 0


def test_every_text_token_attends_to_every_visual_token():
    """One image per sequence: no media mask, every (token, visual token) weight is positive."""
    block, seen = _block(), []
    block.attn.probs_hook = seen.append
    block(_randn(2, 9, D_LM), _randn(2, 6, D_VISUAL, seed=1))
    (probs,) = seen
    assert probs.shape == (2, HEADS, 9, 6) and (probs > 0).all()


def test_flamingo_layers_sit_before_every_nth_block():
    assert FlamingoLayers(D_LM, D_VISUAL, lm_depth=6, every=2, heads=HEADS).layers == (0, 2, 4)
    assert FlamingoLayers(D_LM, D_VISUAL, lm_depth=5, every=2, heads=HEADS).layers == (0, 2, 4)
    assert FlamingoLayers(D_LM, D_VISUAL, lm_depth=3, every=1, heads=HEADS).layers == (0, 1, 2)
    assert FlamingoLayers(D_LM, D_VISUAL, lm_depth=3, every=4, heads=HEADS).layers == (0,)


def test_hook_is_the_identity_on_layers_without_a_block():
    torch.manual_seed(0)
    layers = FlamingoLayers(D_LM, D_VISUAL, lm_depth=4, every=2, heads=HEADS)
    with torch.no_grad():
        for block in layers.blocks.values():
            block.alpha_xattn.fill_(1.0)
            block.alpha_dense.fill_(1.0)
    hook, x = layers.hook(_randn(2, 6, D_VISUAL, seed=1)), _randn(2, 9, D_LM)
    for i in (1, 3):
        assert hook(i, x) is x
    for i in (0, 2):
        assert (hook(i, x) - x).abs().max() > 1e-3
    with pytest.raises(DifflabError, match="LM block 4 is outside the 4 blocks"):
        hook(4, x)


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=30, context_length=16, width=D_LM, depth=4, heads=HEADS)).eval()


def test_gpt_with_closed_gates_is_the_plain_gpt_bitwise():
    """Flamingo's starting point: with every gate at 0 the hooked LM computes the frozen LM's logits."""
    gpt, layers = _gpt(), FlamingoLayers(D_LM, D_VISUAL, lm_depth=4, every=1, heads=HEADS)
    ids = torch.randint(0, 30, (3, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 8:] = False
    visual = _randn(3, 5, D_VISUAL, seed=1)
    plain = gpt(ids, mask=mask)
    assert torch.equal(gpt(ids, mask=mask, hook=layers.hook(visual)), plain)
    with torch.no_grad():
        layers.blocks["2"].alpha_xattn.fill_(0.5)
    assert (gpt(ids, mask=mask, hook=layers.hook(visual)) - plain).abs().max() > 1e-4


def test_gpt_with_the_hook_trains_only_what_it_is_given():
    """A frozen LM, Flamingo style: the loss reaches the gates and the cross-attention, not the LM."""
    gpt, layers = _gpt(), FlamingoLayers(D_LM, D_VISUAL, lm_depth=4, every=2, heads=HEADS)
    gpt.requires_grad_(False)
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(3))
    gpt(ids, hook=layers.hook(_randn(2, 5, D_VISUAL, seed=1))).logsumexp(-1).sum().backward()
    assert all(block.alpha_xattn.grad.abs() > 0 for block in layers.blocks.values())


def test_bad_arguments_are_named():
    with pytest.raises(DifflabError, match="heads=3"):
        GatedCrossAttentionBlock(D_LM, D_VISUAL, 3)
    with pytest.raises(DifflabError, match="every 0"):
        FlamingoLayers(D_LM, D_VISUAL, 4, 0, HEADS)
    with pytest.raises(DifflabError, match="ff_mult 0"):
        GatedCrossAttentionBlock(D_LM, D_VISUAL, HEADS, ff_mult=0)
    with pytest.raises(DifflabError, match=r"\(2, 6, 5\).*\(2, K, 12\)"):
        _block()(_randn(2, 9, D_LM), _randn(2, 6, 5))
