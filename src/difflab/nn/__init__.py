"""Building blocks: timestep embeddings, residual blocks, attention and the one UNet every diffusion
system in difflab uses."""

from difflab.nn.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
