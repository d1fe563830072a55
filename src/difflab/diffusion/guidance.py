r"""Classifier-free guidance (Ho & Salimans 2022) in one batched forward pass, with optional rescale
(Lin et al. 2024, Sec. 3.4).

Guidance scale convention as in Stable Diffusion and diffusers: with conditional and unconditional
("null") predictions,

.. math:: \hat\epsilon_w = \hat\epsilon_\varnothing + w\,(\hat\epsilon_c - \hat\epsilon_\varnothing)

so w = 1 is the plain conditional model and w = 0 the unconditional one (Ho & Salimans write the same
thing with w' = w - 1). The weights sum to one, so guiding epsilon and guiding x0 at the same x_t is
the same operation: the guided pair (eps, x0) stays consistent.

Guidance rescale, Eqs. (15)-(16) of Lin et al. (2024), on the network's own output type (v for
their model; whatever :attr:`Denoiser.prediction_type` is here):

.. math:: x_{\mathrm{rescaled}} = x_{\mathrm{cfg}}\,\frac{\mathrm{std}(x_{\mathrm{pos}})}
          {\mathrm{std}(x_{\mathrm{cfg}})},\qquad
          x_{\mathrm{final}} = \phi\,x_{\mathrm{rescaled}} + (1-\phi)\,x_{\mathrm{cfg}}
"""

from __future__ import annotations

import torch

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.schedules import per_sample
from difflab.errors import DifflabError


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Eqs. (15)-(16) of Lin et al. (2024): match the guided prediction's per-sample std to the
    conditional one's, then blend with weight ``phi``. (B, ...) -> (B, ...)"""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def _with_null(value, null, key: str):
    """Stack a conditioning value over its null counterpart along the batch; a null of batch 1 is
    broadcast to the conditional batch (one empty-prompt embedding serves every sample)."""
    if value is None and null is None:
        return None
    if not isinstance(value, torch.Tensor) or not isinstance(null, torch.Tensor):
        raise DifflabError(f"conditioning '{key}' must be a tensor in both cond and null_cond")
    if null.shape[0] == 1 and value.shape[0] != 1:
        null = null.expand(value.shape[0], *null.shape[1:])
    return torch.cat([value, null])


def classifier_free_guidance(
    denoiser: Denoiser, guidance_scale: float, null_cond: dict, *, guidance_rescale: float = 0.0
):
    """Wrap ``denoiser`` into a guided denoiser with the same interface, ``guided(x, t, **cond)``.

    Each call runs the network once on the batch ``[x; x]`` with conditioning ``[cond; null_cond]``
    (every key of ``cond`` must appear in ``null_cond``) and combines the two halves.
    ``guidance_rescale`` is phi of Lin et al. (2024) (they use 0.7); 0 disables it.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise DifflabError(f"guidance_rescale {guidance_rescale} is invalid; expected a value in [0, 1]")
    if guidance_rescale > 0 and not isinstance(denoiser, Denoiser):
        raise DifflabError("guidance_rescale needs a Denoiser, which knows the network's prediction type")

    def guided(x: torch.Tensor, t, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        if set(cond) != set(null_cond):
            raise DifflabError(
                f"cond keys {sorted(cond)} and null_cond keys {sorted(null_cond)} must be the same"
            )
        t = per_sample(t, x.shape[0])
        both = {k: _with_null(v, null_cond[k], k) for k, v in cond.items()}
        eps, x0 = denoiser(torch.cat([x, x]), torch.cat([t, t]), **both)  # one pass, (2B, ...)
        eps_c, eps_u = eps.chunk(2)
        x0_c, x0_u = x0.chunk(2)
        eps_g = eps_u + guidance_scale * (eps_c - eps_u)
        x0_g = x0_u + guidance_scale * (x0_c - x0_u)
        if guidance_rescale > 0:
            out = rescale_guidance(
                denoiser.to_output(eps_g, x0_g, x, t), denoiser.to_output(eps_c, x0_c, x, t), guidance_rescale
            )
            eps_g, x0_g = denoiser.from_output(out, x, t)
        return eps_g, x0_g

    return guided
