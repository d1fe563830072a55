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


def _stack(values: list, key: str):
    """Stack one conditioning value of several branches along the batch; a value of batch 1 is broadcast
    to the others' batch (one empty-prompt embedding serves every sample)."""
    if all(v is None for v in values):
        return None
    if not all(isinstance(v, torch.Tensor) for v in values):
        raise DifflabError(f"conditioning '{key}' must be a tensor in every condition it is guided between")
    b = max(v.shape[0] for v in values)
    return torch.cat([v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v for v in values])


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
        both = {k: _stack([v, null_cond[k]], k) for k, v in cond.items()}
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


def instruct_guidance(denoiser, text_scale: float, image_scale: float, null_text: dict, null_image: dict):
    r"""InstructPix2Pix's two-scale guidance (Brooks et al. 2023, Eq. 3) over a denoiser conditioned on an
    image c_I and a text c_T, as a guided denoiser ``guided(x, t, **cond)``:

    .. math:: \tilde\epsilon = \epsilon(\varnothing, \varnothing)
              + s_I\,[\epsilon(c_I, \varnothing) - \epsilon(\varnothing, \varnothing)]
              + s_T\,[\epsilon(c_I, c_T) - \epsilon(c_I, \varnothing)]

    ``null_text`` replaces the text's keys of ``cond`` (the empty prompt), ``null_image`` the image's (the
    zero image); every key they name must be in ``cond``. One batched pass of 3B over the three conditions.
    The weights sum to one, so guiding epsilon and x0 alike keeps the pair consistent; with s_I = 1 it is
    ordinary classifier-free guidance of the text with the image in both halves."""
    for name, null in (("null_text", null_text), ("null_image", null_image)):
        if not null:
            raise DifflabError(f"{name} is empty; expected the conditioning keys it replaces")

    def guided(x: torch.Tensor, t, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        missing = (set(null_text) | set(null_image)) - set(cond)
        if missing:
            raise DifflabError(f"cond keys {sorted(cond)} lack {sorted(missing)}, which the null conditions replace")
        image_only = cond | null_text
        neither = image_only | null_image
        t = per_sample(t, x.shape[0])
        stacked = {k: _stack([cond[k], image_only[k], neither[k]], k) for k in cond}
        eps, x0 = denoiser(torch.cat([x, x, x]), torch.cat([t, t, t]), **stacked)  # one pass, (3B, ...)

        def combine(out: torch.Tensor) -> torch.Tensor:
            full, image, none = out.chunk(3)
            return none + image_scale * (image - none) + text_scale * (full - image)

        return combine(eps), combine(x0)

    return guided
