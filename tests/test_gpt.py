"""GPT-2 (difflab.nn.gpt): the same logits as transformers' GPT2LMHeadModel with our weights mapped onto
it (the independent implementation), the mapping's round trip, and the properties the VLMs rely on:
causality, ``embeds`` in place of ids, a hook that changes nothing changes nothing, greedy generation."""

from __future__ import annotations

import pytest
import torch

from difflab.errors import DifflabError
from difflab.nn.gpt import GPT, GPTConfig
from difflab.nn.gpt_hf import from_hf_gpt2, to_hf_gpt2
from difflab.nn.lora import add_lora

SHAPES = [  # vocab, context, width, depth, heads, mlp_ratio
    (50, 16, 32, 2, 4, 4.0),
    (37, 10, 24, 1, 3, 2.0),
    (64, 20, 16, 3, 1, 4.0),
]


def _model(vocab=50, context=16, width=32, depth=2, heads=4, mlp_ratio=4.0, seed=0) -> GPT:
    """A GPT whose every parameter is random: GPT-2's initialisation leaves biases at 0 and LayerNorms at
    (1, 0), where a mapping that mixed them up would go unseen."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab, context, width, depth, heads, mlp_ratio)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf(model: GPT):
    transformers = pytest.importorskip("transformers")
    kwargs, state = to_hf_gpt2(model, bos_id=1, eos_id=2)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    hf.load_state_dict(state, strict=True)
    return hf, kwargs


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers_gpt2(shape, single_thread):
    model = _model(*shape)
    hf, _ = _hf(model)
    vocab, context = shape[0], shape[1]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, context), generator=g)
    mask = torch.ones(3, context, dtype=torch.bool)
    mask[1, context // 2 :] = False  # right padding
    mask[2, 3:] = False
    with torch.no_grad():
        ours = model(ids, mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask.long()).logits
        plain = model(ids[:, :5])
        theirs_plain = hf(input_ids=ids[:, :5]).logits
        from_embeds = model(embeds=model.embed(ids), mask=mask)
    # padded positions' outputs are never read, and differ (ours attend to themselves, see causal_padding_mask)
    assert (ours - theirs)[mask].abs().max() < 1e-5
    assert (plain - theirs_plain).abs().max() < 1e-5
    assert torch.equal(from_embeds, ours)


def test_the_mapping_round_trips(single_thread):
    model = _model()
    hf, kwargs = _hf(model)
    back = from_hf_gpt2(hf.state_dict(), kwargs)
    assert back.cfg == model.cfg
    ours, again = model.state_dict(), back.state_dict()
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    # a GPT2Model's weights (no 'transformer.' prefix, no head) read the same
    body = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert all(torch.equal(v, from_hf_gpt2(body, kwargs).state_dict()[k]) for k, v in ours.items())


def test_the_mapping_refuses_what_would_compute_other_logits():
    model = _model()
    kwargs, state = to_hf_gpt2(model)
    with pytest.raises(DifflabError, match=r"activation_function='relu' does not map onto difflab's GPT"):
        from_hf_gpt2(state, kwargs | {"activation_function": "relu"})
    with pytest.raises(DifflabError, match="lm_head.weight differs from wte.weight"):
        from_hf_gpt2(state | {"lm_head.weight": state["lm_head.weight"] + 1}, kwargs)
    with pytest.raises(DifflabError, match="GPT-2 config has no 'n_embd'"):
        from_hf_gpt2(state, {k: v for k, v in kwargs.items() if k != "n_embd"})


def test_attention_is_causal(single_thread):
    model = _model()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :7], b[:, :7])  # bitwise: a later token cannot reach an earlier position
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_a_hook_that_returns_its_input_changes_nothing(single_thread):
    model = _model()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    seen = []

    def identity(i, x):
        seen.append((i, tuple(x.shape)))
        return x

    with torch.no_grad():
        assert torch.equal(model(ids), model(ids, hook=identity))
        shifted = model(ids, hook=lambda i, x: x + 1.0 if i == 1 else x)
    assert seen == [(0, (2, 9, 32)), (1, (2, 9, 32))]  # before each block, on the residual stream
    assert not torch.equal(shifted, model(ids))


def test_lora_wraps_the_attention_and_starts_as_the_base(single_thread):
    model = _model()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids)
        names = add_lora(model, rank=2)
        after = model(ids)
    assert "blocks.0.attn.to_q" in names and len(names) == 4 * model.cfg.depth
    assert torch.equal(before, after)  # B = 0: the adapted network is the base


def test_bad_inputs_are_named():
    model = _model(context=8)
    ids = torch.zeros(1, 9, dtype=torch.long)
    with pytest.raises(DifflabError, match="9 tokens exceed the context length 8"):
        model(ids)
    with pytest.raises(DifflabError, match="exactly one of ids .* got both"):
        model(ids[:, :4], embeds=model.embed(ids[:, :4]))
    with pytest.raises(DifflabError, match="got neither"):
        model()
    with pytest.raises(DifflabError, match=r"embeds has shape \(1, 4, 7\); expected \(B, L, 32\)"):
        model(embeds=torch.zeros(1, 4, 7))
    with pytest.raises(DifflabError, match=r"mask has shape \(1, 3\); expected \(1, 4\)"):
        model(ids[:, :4], mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(DifflabError, match="4 prompt \\+ 6 new tokens exceed the context length 8"):
        model.generate(ids[:, :4], max_new_tokens=6, eos_id=2)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("heads", 3, "width 32 is invalid; expected a multiple of heads (3)"),
        ("vocab_size", 0, "vocab_size 0 is invalid"),
        ("context_length", 0, "context_length 0 is invalid"),
        ("dropout", 1.0, "dropout 1.0 is invalid"),
        ("mlp_ratio", 0.0, "mlp_ratio 0.0 is invalid"),
    ],
)
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(DifflabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GPTConfig(**({"width": 32, "heads": 4} | {field: value}))


def test_greedy_generation_is_the_argmax_continuation_of_each_row(single_thread):
    model = _model()
    ids = torch.tensor([[1, 5, 9, 4, 0, 0], [1, 7, 0, 0, 0, 0]])
    mask = ids != 0
    new = model.generate(ids, mask=mask, max_new_tokens=4, eos_id=99)  # an id that never comes: 4 tokens
    for row, tokens in zip(ids, new, strict=True):
        seq = row[row != 0].tolist()
        for _ in range(4):  # one row alone, token by token
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert tokens == seq[-4:]
    # a row stops at eos, which is not returned
    eos = new[1][0]
    stopped = model.generate(ids, mask=mask, max_new_tokens=4, eos_id=eos)
    assert stopped == [t[: t.index(eos)] if eos in t else t for t in new] and stopped[1] == []
    # a prefix of embeddings goes before the tokens (LLaVA's visual tokens)
    prefix = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(5))
    first = model.generate(ids[:, :2], prefix=prefix, max_new_tokens=1, eos_id=99)
    with torch.no_grad():
        logits = model(embeds=torch.cat([prefix, model.embed(ids[:, :2])], 1))
    assert [t[0] for t in first] == logits[:, -1].argmax(-1).tolist()
    # sampling is reproducible from its generator
    draw = [model.generate(ids, mask=mask, max_new_tokens=4, eos_id=99, temperature=1.0,
                           generator=torch.Generator().manual_seed(6)) for _ in range(2)]  # fmt: skip
    assert draw[0] == draw[1]
