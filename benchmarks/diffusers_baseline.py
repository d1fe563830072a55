"""diffusers' UNet2DModel behind difflab's network signature ``net(x, t, class_labels=None) -> tensor``,
the baseline of the benchmarks that compare against it (pixel_learning.py, train_throughput.py).

diffusers is a benchmark baseline only; difflab itself never imports it.
"""

from __future__ import annotations

import torch


class DiffusersUNet(torch.nn.Module):
    """UNet2DModel with ``layers_per_block=2``, 8 norm groups, 8-wide attention heads (diffusers'
    defaults for the last two) and attention at level ``attn_level`` of ``widths``, down and up.
    ``num_class_embeds`` adds a class embedding; ``scale_shift`` switches the residual blocks' time
    conditioning to scale-and-shift, as difflab's UNet does (for a matched comparison). ``head_dim`` is
    diffusers' ``attention_head_dim``, the width of each head."""

    def __init__(
        self, side: int, channels: int, widths: tuple[int, ...], attn_level: int, *,
        num_class_embeds: int | None = None, scale_shift: bool = False, head_dim: int = 8,
    ):  # fmt: skip
        super().__init__()
        from diffusers import UNet2DModel

        levels = len(widths)
        down = ["AttnDownBlock2D" if i == attn_level else "DownBlock2D" for i in range(levels)]
        up = ["AttnUpBlock2D" if i == levels - 1 - attn_level else "UpBlock2D" for i in range(levels)]
        self.net = UNet2DModel(
            sample_size=side, in_channels=channels, out_channels=channels, block_out_channels=widths,
            layers_per_block=2, down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=8,
            attention_head_dim=head_dim, num_class_embeds=num_class_embeds,
            resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        )  # fmt: skip

    def forward(self, x, t, class_labels=None):
        return self.net(x, t, class_labels=class_labels).sample
