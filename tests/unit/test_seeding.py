"""Per-image noise: an image's noise depends on its seed only."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.seeding import ImageNoise


def test_rows_depend_on_their_seed_only() -> None:
    alone = ImageNoise([5]).randn((3, 4, 4))
    batch = ImageNoise([9, 5, 2, 7, 1, 0, 3, 8]).randn((3, 4, 4))
    assert batch.shape == (8, 3, 4, 4) and batch.dtype == torch.float64
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=0)
    assert not torch.equal(batch[0], batch[1])


def test_row_equals_a_generator_seeded_with_the_seed() -> None:
    expected = torch.randn(
        (2, 3), generator=torch.Generator().manual_seed(123), dtype=torch.float64
    )
    assert torch.equal(ImageNoise([123]).randn((2, 3))[0], expected)


def test_successive_draws_continue_each_stream() -> None:
    noise = ImageNoise([1, 2])
    first, second = noise.randn((4,)), noise.randn((4,))
    g = torch.Generator().manual_seed(2)
    stream = torch.randn(8, generator=g, dtype=torch.float64)
    assert torch.equal(torch.cat([first[1], second[1]]), stream)
    # and a fresh ImageNoise restarts the stream
    assert torch.equal(ImageNoise(torch.tensor([1, 2])).randn((4,)), first)


def test_dtype_and_device() -> None:
    noise = ImageNoise([0, 1], device="cpu")
    out = noise.randn((2,), dtype=torch.float32)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert len(noise) == 2


@pytest.mark.parametrize(
    "seeds, message",
    [
        ([], "seeds is empty"),
        ([1, -2], "non-negative, got -2"),
        (torch.zeros(2, 2, dtype=torch.long), "1-D integer"),
    ],
)
def test_rejects_bad_seeds(seeds, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageNoise(seeds)
