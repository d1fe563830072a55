"""The adversarial half of a first-stage autoencoder: a PatchGAN discriminator, hinge losses, and the
adaptive weight that balances the GAN term against reconstruction.

Esser et al. (2021, "Taming Transformers for High-Resolution Image Synthesis", Sec. 3.1) train their
VQGAN autoencoder with a reconstruction + perceptual loss plus a patch-based adversarial loss; the
latent diffusion autoencoders of Rombach et al. (2022, Sec. 3.1 and App. G) reuse this objective. The
discriminator judges overlapping patches rather than the whole image, so it penalises blur and texture
errors locally, which pixel losses cannot see.

Glossary (Esser et al. 2021, Eq. 7):
    L_rec        reconstruction (+ perceptual) loss of the decoder output
    L_GAN        generator's adversarial loss
    G_L          the decoder's last layer
    lambda       adaptive weight of L_GAN: ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, "pix2pix", Sec. 3.2.2 and App. 6.1.2) as used by Esser et al. (2021):
    (B, C, H, W) -> (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2) real/fake logits, one per patch.

    conv4x4/s2 + LeakyReLU(0.2); ``n_layers - 1`` x [conv4x4/s2 + GroupNorm + LeakyReLU] doubling the
    width (capped at 8x ``channels``); conv4x4/s1 + GroupNorm + LeakyReLU; conv4x4/s1 -> 1 channel.
    With padding 1 a stride-2 4x4 conv maps H -> floor(H / 2) and a stride-1 one H -> H - 1, so the
    patch grid is ``floor(H / 2**n_layers) - 2`` on a side:

        32x32, n_layers=2  ->  (B, 1, 6, 6)
        16x16, n_layers=1  ->  (B, 1, 6, 6)
        256x256, n_layers=3 -> (B, 1, 30, 30)  (pix2pix's 70x70-receptive-field PatchGAN)

    The input must be at least ``3 * 2**n_layers`` pixels on a side for one logit to remain.

    GroupNorm, not pix2pix's BatchNorm: batch statistics would mix the real and fake batches (and the
    samples within each), so a sample's logit would depend on what it was batched with; GroupNorm
    normalises each sample on its own. Weights start as N(0, 0.02), norm scales as N(1, 0.02)
    (Radford et al. 2016, "DCGAN", Sec. 4), as Esser et al. initialise theirs.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm_groups: int = 8):
        super().__init__()
        if n_layers < 1:
            raise DifflabError(f"PatchDiscriminator needs n_layers >= 1; got n_layers={n_layers}")
        if channels % norm_groups:
            # Every normalised width is a multiple of ``channels``, so this one check covers all of them.
            raise DifflabError(
                f"discriminator width channels={channels} is not divisible by norm_groups={norm_groups}"
            )
        self.n_layers = n_layers
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        c_in = channels
        for i in range(1, n_layers + 1):
            c_out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            # No bias: the GroupNorm right after subtracts each group's mean, which would cancel it.
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(norm_groups, c_out),
                nn.LeakyReLU(0.2),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def min_size(self) -> int:
        """Smallest input side that leaves a 1x1 patch grid: ``3 * 2**n_layers``."""
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise DifflabError(f"PatchDiscriminator expects (B, C, H, W) images; got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size():
            raise DifflabError(
                f"input {h}x{w} is too small for a PatchDiscriminator with n_layers={self.n_layers}; "
                f"expected at least {self.min_size()}x{self.min_size()}"
            )
        return self.main(x)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017, "Geometric GAN"; the form Esser et al. 2021 train with):
    ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))``, a scalar.

    Real logits above +1 and fake ones below -1 cost nothing, so a confident discriminator stops
    pushing its logits apart and its gradients stay bounded.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: ``-mean(D(x_hat))`` (Esser et al. 2021, L_GAN in Eq. 7), a scalar."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """Adaptive weight of the GAN loss, Eq. (7) of Esser et al. (2021):

        lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta),   clamped to [0, max_weight]

    with ``G_L`` = ``last_layer`` (the decoder's final weight) and delta = 1e-4. It scales the GAN term so
    its gradient at the decoder output is as large as the reconstruction's, whatever their raw scales.
    Returned detached: lambda is a coefficient, not something to differentiate through. Both graphs are
    kept (``retain_graph=True``) because the caller still back-propagates the weighted total.
    """
    if not last_layer.requires_grad:
        raise DifflabError(
            f"adaptive_gan_weight needs a last_layer that requires grad; got a {tuple(last_layer.shape)} "
            "tensor with requires_grad=False"
        )
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
