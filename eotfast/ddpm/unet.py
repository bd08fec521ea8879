"""Conditional U-Net for image-to-image DDPMs (Palette-style conditioning).

The condition image is concatenated to the noisy image on channels; the network predicts
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (the trainer's default) or the noise eps,
as ``GaussianDiffusion.prediction`` says (the architecture is the same). Layout follows
Ho et al. (2020), "Denoising Diffusion Probabilistic Models": residual blocks with GroupNorm
and a sinusoidal time embedding, self-attention at low resolution, skip connections from every
encoder block to the decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConditionalUNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps: [batch] -> [batch, dim] (Vaswani et al.)."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    angles = t.float()[:, None] * frequencies[None, :]  # [batch, half]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, time embedding added, twice, plus a (1x1) skip path."""

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, num_groups: int, dropout: float
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(time_emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, num_groups: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each [b, heads, h*w, c/heads]
        attended = F.scaled_dot_product_attention(q, k, v)  # [b, heads, h*w, c/heads]
        attended = attended.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(attended)


class ConditionalUNet(nn.Module):
    """Denoising U-Net conditioned on an image of the source domain.

    ``forward(x_t, t, cond)`` maps the noisy target image ``x_t`` [B, C, H, W], the timesteps
    ``t`` [B] and the condition image ``cond`` [B, C_cond, H, W] to the prediction
    [B, C, H, W]: v by default, or the noise eps (see ``GaussianDiffusion.prediction``).
    H and W must be divisible by ``2 ** (len(channel_mults) - 1)``.
    """

    def __init__(
        self,
        image_channels: int = 3,                 # channels of the generated (target) image
        cond_channels: int = 3,                  # channels of the condition (source) image
        base_channels: int = 64,                 # width at full resolution
        channel_mults: tuple[int, ...] = (1, 2, 2),  # width multiplier per resolution level
        num_res_blocks: int = 2,                 # residual blocks per level in the encoder
        attention_levels: tuple[int, ...] = (2,),  # levels with self-attention (0 = full res)
        num_heads: int = 4,                      # attention heads
        num_groups: int = 8,                     # GroupNorm groups (divides every width)
        dropout: float = 0.0,                    # dropout inside residual blocks
    ):  # fmt: skip
        super().__init__()
        self.image_channels = image_channels
        self.base_channels = base_channels
        self.downsample_factor = 2 ** (len(channel_mults) - 1)
        time_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.input_conv = nn.Conv2d(image_channels + cond_channels, base_channels, 3, padding=1)

        def block(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, time_dim, num_groups, dropout)

        def attention(level: int, channels: int) -> nn.Module:
            return (
                SelfAttention(channels, num_groups, num_heads)
                if level in attention_levels
                else nn.Identity()
            )

        # Encoder: every block's output is kept as a skip connection for the decoder.
        self.down_blocks, self.down_attention = nn.ModuleList(), nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels, channels = [base_channels], base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down_blocks.append(block(channels, base_channels * mult))
                channels = base_channels * mult
                self.down_attention.append(attention(level, channels))
                skip_channels.append(channels)
            if level < len(channel_mults) - 1:
                self.downsamplers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)

        self.mid_block1 = block(channels, channels)
        self.mid_attention = SelfAttention(channels, num_groups, num_heads)
        self.mid_block2 = block(channels, channels)

        # Decoder: one more block per level than the encoder, each eating one skip.
        self.up_blocks, self.up_attention = nn.ModuleList(), nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up_blocks.append(block(channels + skip_channels.pop(), base_channels * mult))
                channels = base_channels * mult
                self.up_attention.append(attention(level, channels))
            if level > 0:
                self.upsamplers.append(nn.Conv2d(channels, channels, 3, padding=1))

        self.output = nn.Sequential(
            nn.GroupNorm(num_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, image_channels, 3, padding=1),
        )
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)
        self.num_res_blocks = num_res_blocks
        self.num_levels = len(channel_mults)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        time_emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.input_conv(torch.cat([x_t, cond], dim=1))
        skips = [h]
        blocks = iter(zip(self.down_blocks, self.down_attention, strict=True))
        for level in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                res_block, attn = next(blocks)
                h = attn(res_block(h, time_emb))
                skips.append(h)
            if level < self.num_levels - 1:
                h = self.downsamplers[level](h)
                skips.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(h, time_emb)), time_emb)

        blocks = iter(zip(self.up_blocks, self.up_attention, strict=True))
        for level in reversed(range(self.num_levels)):
            for _ in range(self.num_res_blocks + 1):
                res_block, attn = next(blocks)
                h = attn(res_block(torch.cat([h, skips.pop()], dim=1), time_emb))
            if level > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsamplers[self.num_levels - 1 - level](h)
        return self.output(h)
