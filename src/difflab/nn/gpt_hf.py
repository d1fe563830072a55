"""Our GPT's weights as ``transformers``' GPT2LMHeadModel names them, and back: the check that
:mod:`difflab.nn.gpt` is GPT-2 (tests/test_gpt.py compares the logits), and a way to read a GPT-2
checkpoint. Nothing here imports ``transformers``; the dicts are what it loads.

Two differences of layout, none of computation:

- GPT-2's linear layers are ``Conv1D`` modules, which store the weight as (in, out) and compute
  ``x @ W + b``; ``nn.Linear`` stores (out, in). Every weight is transposed on the way.
- GPT-2 fuses the query, key and value projections into one ``c_attn`` of width 3D, in that order
  (q | k | v along its output); ours are ``to_q``, ``to_k``, ``to_v``, so that LoRA can wrap each.

    ours                           GPT2LMHeadModel
    wte, wpe                       transformer.wte, transformer.wpe
    blocks.i.norm1 / norm2         transformer.h.i.ln_1 / ln_2
    blocks.i.attn.to_q|to_k|to_v   transformer.h.i.attn.c_attn    (concatenated, transposed)
    blocks.i.attn.to_out           transformer.h.i.attn.c_proj    (transposed)
    blocks.i.mlp.0 / mlp.2         transformer.h.i.mlp.c_fc / c_proj (transposed)
    ln_f                           transformer.ln_f
    wte (tied)                     lm_head
"""

from __future__ import annotations

import torch

from difflab.errors import DifflabError
from difflab.nn.gpt import GPT, GPTConfig

LAYER_NORM_EPS = 1e-5
"""``nn.LayerNorm``'s epsilon, and GPT2Config's ``layer_norm_epsilon`` default."""
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
"""transformers' names of the tanh approximation of GELU (one formula, two implementations)."""


def to_hf_gpt2(model: GPT, *, bos_id: int | None = None, eos_id: int | None = None) -> tuple[dict, dict]:
    """``(config_kwargs, state_dict)`` such that ``GPT2LMHeadModel(GPT2Config(**config_kwargs))`` loads
    ``state_dict`` (strictly) and computes our logits. ``bos_id``/``eos_id``: the tokenizer's, recorded in
    the config (GPT2Config's default, 50256, is outside a small vocabulary)."""
    cfg = model.cfg
    config = {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.width,
        "n_layer": cfg.depth,
        "n_head": cfg.heads,
        "n_inner": int(cfg.width * cfg.mlp_ratio),
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,  # our attention drops no probabilities
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"]}
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [f"{src}attn.to_{n}" for n in "qkv"]
        out |= {
            f"{dst}ln_1.weight": ours[f"{src}norm1.weight"],
            f"{dst}ln_1.bias": ours[f"{src}norm1.bias"],
            # (3D, D) stacked q | k | v, transposed to Conv1D's (D, 3D)
            f"{dst}attn.c_attn.weight": torch.cat([ours[f"{n}.weight"] for n in qkv]).T.contiguous(),
            f"{dst}attn.c_attn.bias": torch.cat([ours[f"{n}.bias"] for n in qkv]),
            f"{dst}attn.c_proj.weight": ours[f"{src}attn.to_out.weight"].T.contiguous(),
            f"{dst}attn.c_proj.bias": ours[f"{src}attn.to_out.bias"],
            f"{dst}ln_2.weight": ours[f"{src}norm2.weight"],
            f"{dst}ln_2.bias": ours[f"{src}norm2.bias"],
            f"{dst}mlp.c_fc.weight": ours[f"{src}mlp.0.weight"].T.contiguous(),
            f"{dst}mlp.c_fc.bias": ours[f"{src}mlp.0.bias"],
            f"{dst}mlp.c_proj.weight": ours[f"{src}mlp.2.weight"].T.contiguous(),
            f"{dst}mlp.c_proj.bias": ours[f"{src}mlp.2.bias"],
        }
    out |= {"transformer.ln_f.weight": ours["ln_f.weight"], "transformer.ln_f.bias": ours["ln_f.bias"],
            "lm_head.weight": ours["wte.weight"]}  # fmt: skip
    return config, out


def _checked_config(config: dict) -> GPTConfig:
    """Our config of a GPT2Config's keyword arguments; an error for any setting that would compute other
    logits than our GPT does."""
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if key not in config:
            raise DifflabError(f"GPT-2 config has no '{key}'; expected the sizes vocab_size, n_positions, "
                               "n_embd, n_layer and n_head")  # fmt: skip
    # Defaults are GPT2Config's own.
    expected = {"activation_function": ("gelu_new", TANH_GELU), "layer_norm_epsilon": (LAYER_NORM_EPS, None),
                "scale_attn_weights": (True, None), "scale_attn_by_inverse_layer_idx": (False, None),
                "tie_word_embeddings": (True, None), "add_cross_attention": (False, None)}  # fmt: skip
    for key, (default, allowed) in expected.items():
        value = config.get(key, default)
        if value not in (allowed or (default,)):
            raise DifflabError(f"GPT-2 config {key}={value!r} does not map onto difflab's GPT; expected "
                               f"{' or '.join(map(repr, allowed or (default,)))}")  # fmt: skip
    width = config["n_embd"]
    inner = config.get("n_inner") or 4 * width
    if int(width * (inner / width)) != inner:  # our MLP is int(width * mlp_ratio) wide
        raise DifflabError(
            f"GPT-2 config n_inner={inner} is not a width {width} * ratio can give; expected another"
        )
    return GPTConfig(vocab_size=config["vocab_size"], context_length=config["n_positions"], width=width,
                     depth=config["n_layer"], heads=config["n_head"], mlp_ratio=inner / width,
                     dropout=float(config.get("resid_pdrop", 0.1)))  # fmt: skip


def from_hf_gpt2(state_dict: dict, config_kwargs: dict) -> GPT:
    """Our GPT with the weights of a GPT2LMHeadModel (or GPT2Model: the ``transformer.`` prefix is
    optional) whose GPT2Config has ``config_kwargs``. Dropout is read from ``resid_pdrop``; GPT-2's
    ``attn_pdrop`` (dropout of attention probabilities) has no counterpart here and matters in training only."""
    cfg = _checked_config(config_kwargs)
    hf = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    model = GPT(cfg)
    d = cfg.width

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise DifflabError(f"GPT-2 state dict has no '{key}'; expected a GPT2LMHeadModel's weights")
        return hf[key]

    ours = {"wte.weight": take("wte.weight"), "wpe.weight": take("wpe.weight"),
            "ln_f.weight": take("ln_f.weight"), "ln_f.bias": take("ln_f.bias")}  # fmt: skip
    for i in range(cfg.depth):
        src, dst = f"h.{i}.", f"blocks.{i}."
        qkv_w = take(f"{src}attn.c_attn.weight").T  # (3D, D): q | k | v along the output
        qkv_b = take(f"{src}attn.c_attn.bias")
        for j, n in enumerate("qkv"):
            ours[f"{dst}attn.to_{n}.weight"] = qkv_w[j * d : (j + 1) * d]
            ours[f"{dst}attn.to_{n}.bias"] = qkv_b[j * d : (j + 1) * d]
        ours |= {
            f"{dst}norm1.weight": take(f"{src}ln_1.weight"),
            f"{dst}norm1.bias": take(f"{src}ln_1.bias"),
            f"{dst}attn.to_out.weight": take(f"{src}attn.c_proj.weight").T,
            f"{dst}attn.to_out.bias": take(f"{src}attn.c_proj.bias"),
            f"{dst}norm2.weight": take(f"{src}ln_2.weight"),
            f"{dst}norm2.bias": take(f"{src}ln_2.bias"),
            f"{dst}mlp.0.weight": take(f"{src}mlp.c_fc.weight").T,
            f"{dst}mlp.0.bias": take(f"{src}mlp.c_fc.bias"),
            f"{dst}mlp.2.weight": take(f"{src}mlp.c_proj.weight").T,
            f"{dst}mlp.2.bias": take(f"{src}mlp.c_proj.bias"),
        }
    head = state_dict.get("lm_head.weight")
    if head is not None and not torch.equal(head, ours["wte.weight"]):
        raise DifflabError(
            "GPT-2 lm_head.weight differs from wte.weight; expected the tied head difflab's GPT has"
        )
    try:
        model.load_state_dict(ours)
    except RuntimeError as err:  # a shape that does not match the config
        raise DifflabError(
            f"GPT-2 weights do not fit its config ({str(err).splitlines()[-1].strip()})"
        ) from None
    return model
