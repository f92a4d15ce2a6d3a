"""Per-image randomness: one torch.Generator per image, so an image depends on its seed only.

As in EDM's generate.py (StackedRandomGenerator), image i's noise comes from its own generator
seeded with seeds[i]; the result is identical whatever the batch size, the batch's other seeds,
the worker count or a retry, which is what makes a seed range shardable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ImageNoise:
    """Gaussian noise for a batch of images, row i drawn from image i's own stream.

    seeds: one non-negative int per image (a sequence or 1-D integer tensor); device: where the
    returned tensors live. The generators are CPU generators (the same stream on every device,
    GPU included) seeded once here and kept: successive ``randn`` calls continue each image's
    stream (initial noise, then the per-step noise of a stochastic sampler).
    """

    def __init__(self, seeds: Sequence[int] | Tensor, device: torch.device | str = "cpu") -> None:
        if isinstance(seeds, Tensor):
            if seeds.dim() != 1 or seeds.dtype.is_floating_point:
                raise ValueError(
                    f"seeds must be a 1-D integer tensor, got {seeds.dtype} of shape "
                    f"{tuple(seeds.shape)}"
                )
            seeds = seeds.tolist()
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("seeds is empty; pass one seed per image")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be non-negative, got {min(seeds)}")
        self.seeds = seeds
        self.device = torch.device(device)
        self._generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape_per_image: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
        """Standard normal noise [B, *shape_per_image] in ``dtype`` on ``self.device``.

        The stream depends on ``dtype`` (float32 and float64 draws differ), so draw in the same
        dtype wherever the images must agree.
        """
        rows = [torch.randn(shape_per_image, generator=g, dtype=dtype) for g in self._generators]
        return torch.stack(rows).to(self.device)
