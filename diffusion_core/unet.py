"""The DDPM UNet denoiser network (Ho et al. 2020, App. B) and its config.

Layout per level (as in DDPM and diffusers' `UNet2DModel`): `num_res_blocks` residual blocks (with
self-attention after each where the level's spatial size is in `attention_resolutions`), then a
strided-conv downsample except at the last level; a middle ResBlock-Attention-ResBlock; and the
mirror image going up with `num_res_blocks + 1` blocks per level, each consuming one skip
connection. The network returns the raw prediction (eps, x0 or v, by how it was trained).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_core.nn_blocks import (
    GROUP_NORM_EPS,
    AttentionBlock,
    Downsample,
    ResAttnBlock,
    ResBlock,
    Upsample,
    timestep_embedding,
)

TimeConditioning = Literal["scale_shift", "additive"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the UNet. Spatial sizes are in pixels; channels are per level.

    `channel_mult[i] * base_channels` is the width of level i, whose spatial size is
    `image_size // 2**i`. `attention_resolutions` lists the spatial sizes that get self-attention
    (the middle block always has it). `num_classes` enables class conditioning with an extra
    null label (index `num_classes`) for classifier-free guidance.
    """

    in_channels: int = 1
    image_size: int = 16
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 1
    groups: int = 8
    dropout: float = 0.0
    num_classes: int | None = None
    time_conditioning: TimeConditioning = "scale_shift"

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; accept them so from_dict(json.loads(...)) round-trips.
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, value: object, why: str) -> ValueError:
            return ValueError(f"UNetConfig.{field}={value!r} is invalid: {why}")

        for field in ("in_channels", "image_size", "base_channels", "num_res_blocks", "num_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(field, value, "expected a positive integer")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise bad("channel_mult", self.channel_mult, "expected a non-empty tuple of ints >= 1")
        if self.base_channels % 2:
            raise bad("base_channels", self.base_channels, "must be even (sinusoidal embedding)")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise bad(
                "image_size",
                self.image_size,
                f"must be divisible by 2**(len(channel_mult)-1) = {factor}",
            )
        sizes = self.level_sizes
        for res in self.attention_resolutions:
            if res not in sizes:
                raise bad(
                    "attention_resolutions", self.attention_resolutions,
                    f"{res} is not a level size; choose from {sizes}",
                )  # fmt: skip
        widths = [self.base_channels * m for m in self.channel_mult]
        if not isinstance(self.groups, int) or self.groups < 1:
            raise bad("groups", self.groups, "expected a positive integer")
        for width in widths:
            if width % self.groups:
                raise bad("groups", self.groups, f"does not divide level width {width}")
        attn_widths = [widths[sizes.index(r)] for r in self.attention_resolutions] + [widths[-1]]
        for width in attn_widths:
            if width % self.num_heads:
                raise bad("num_heads", self.num_heads, f"does not divide attention width {width}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", self.dropout, "expected 0 <= dropout < 1")
        if self.num_classes is not None and (
            not isinstance(self.num_classes, int) or self.num_classes < 1
        ):
            raise bad("num_classes", self.num_classes, "expected None or a positive integer")
        if self.time_conditioning not in ("scale_shift", "additive"):
            raise bad("time_conditioning", self.time_conditioning, "choose scale_shift or additive")

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Spatial size of each level, e.g. (16, 8, 4)."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    @property
    def emb_dim(self) -> int:
        """Width of the time/class embedding (4 * base_channels, as in DDPM)."""
        return 4 * self.base_channels

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"UNetConfig got unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


class UNet(nn.Module):
    """DDPM UNet: `forward(x [B,C,H,W], t [B], class_labels [B] | None) -> [B,C,H,W]`."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        emb_dim = cfg.emb_dim
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        sizes = cfg.level_sizes

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(
                cin,
                cout,
                emb_dim,
                groups=cfg.groups,
                dropout=cfg.dropout,
                scale_shift=cfg.time_conditioning == "scale_shift",
            )

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=cfg.num_heads, groups=cfg.groups)

        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = (
            nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [widths[0]]
        ch = widths[0]
        for level, (width, size) in enumerate(zip(widths, sizes, strict=True)):
            use_attn = size in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResAttnBlock(res(ch, width), attn(width) if use_attn else None))
                ch = width
                skip_channels.append(ch)
            if level < len(widths) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid_res1 = res(ch, ch)
        self.mid_attn = attn(ch)
        self.mid_res2 = res(ch, ch)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, size = widths[level], sizes[level]
            use_attn = size in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks + 1):
                block = res(ch + skip_channels.pop(), width)
                self.up.append(ResAttnBlock(block, attn(width) if use_attn else None))
                ch = width
            if level > 0:
                self.up.append(Upsample(ch))
        assert not skip_channels

        self.norm_out = nn.GroupNorm(cfg.groups, ch, eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        # Zero output: the untrained network predicts 0, a stable start for eps/v targets.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)  # type: ignore[arg-type]

    @property
    def null_label(self) -> int | None:
        """Class index meaning "no class" (classifier-free guidance), or None if unconditional."""
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Predict the diffusion target for noisy images.

        x: `[B, C, H, W]` noisy images; t: `[B]` timesteps, long or float, or one timestep for
        the whole batch (scalar or `[1]`: the embedding is then computed once and broadcast, as
        samplers step all images together); class_labels: `[B]` long in `[0, num_classes]`
        (`num_classes` = null label), or None, which means the null label for a class-conditional
        net. Returns `[B, C, H, W]`.
        """
        emb = self.time_mlp(timestep_embedding(t.reshape(-1), self.config.base_channels))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full(
                    (x.shape[0],), self.class_embed.num_embeddings - 1, device=x.device
                )
            emb = emb + self.class_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet (num_classes=None)")
        # Every ResBlock's embedding projection starts with SiLU; apply it once here.
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for block in self.up:
            if isinstance(block, ResAttnBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        h = F.silu(self.norm_out(h), inplace=True)
        return self.conv_out(h)
