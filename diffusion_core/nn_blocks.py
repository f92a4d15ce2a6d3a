"""Building blocks of the DDPM UNet (Ho et al. 2020, App. B; Nichol & Dhariwal 2021).

Every block takes and returns `[B, C, H, W]` feature maps in either memory format (contiguous or
channels_last). The blocks are written for few kernel launches: one fused qkv projection, one
`F.scaled_dot_product_attention` call, GroupNorm via `F.group_norm`, and SiLU applied in place
where autograd does not need its input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUP_NORM_EPS = 1e-5


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, sec. 3.5), cosines first.

    t: `[B]` integer or real timesteps. Returns `[B, dim]` float32; matches diffusers'
    `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (
        -math.log(max_period) / half
    )
    args = t.to(torch.float32)[:, None] * exponent.exp()[None, :]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    # group_norm's backward needs its input, not its output, so SiLU may overwrite the output.
    # Under autograd, silu_ saves the pre-activation itself; in inference it saves an allocation.
    h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(h, inplace=True)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding injected between the convolutions.

    `scale_shift=True` is improved-diffusion's `h = GN(h) * (1 + scale) + shift`; otherwise the
    embedding is added before the second norm as in DDPM. `emb` is the already-activated
    (SiLU) time/class embedding `[B, emb_dim]`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        groups: int,
        dropout: float,
        scale_shift: bool,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.dropout = dropout
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(_norm_silu(self.norm1, x))
        e = self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            n = self.norm2
            h = F.group_norm(h, n.num_groups, n.weight, n.bias, n.eps)
            h = F.silu(torch.addcmul(shift, h, scale + 1.0), inplace=True)
        else:
            h = _norm_silu(self.norm2, h + e)
        if self.dropout > 0.0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(h)
        return h.add_(x if self.skip is None else self.skip(x))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    One fused qkv projection and one `F.scaled_dot_product_attention` call; the projections are
    batched matrix products on the `[B, C, H*W]` view, so neither memory format needs a permute
    of the input.
    """

    def __init__(self, channels: int, *, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, height, width = x.shape
        n = self.norm
        h = F.group_norm(x, n.num_groups, n.weight, n.bias, n.eps).flatten(2).transpose(1, 2)
        qkv = self.qkv(h)  # [B, L, 3C]
        q, k, v = qkv.view(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, C/heads]
        out = self.proj(out.transpose(1, 2).reshape(b, -1, c))  # [B, L, C]
        return x + out.transpose(1, 2).view(b, c, height, width)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResAttnBlock(nn.Module):
    """A ResBlock optionally followed by self-attention: one stage of a UNet level."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.res(x, emb)
        return h if self.attn is None else self.attn(h)
