"""UNet and UNetConfig: shapes, conditioning, validation, serialization, memory formats."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_core.unet import UNet, UNetConfig

SMALL = UNetConfig(base_channels=16, groups=4, num_classes=3)


def _perturb_output_layer(net: UNet) -> None:
    # The output conv starts at zero (every input maps to 0); give it weights so tests see signal.
    torch.manual_seed(1)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)


@pytest.fixture
def net() -> UNet:
    torch.manual_seed(0)
    net = UNet(SMALL)
    _perturb_output_layer(net)
    return net


def test_output_shape_and_timestep_dtypes(net: UNet) -> None:
    x = torch.randn(3, 1, 16, 16)
    out_long = net(x, torch.tensor([0, 10, 999]))
    out_float = net(x, torch.tensor([0.0, 10.0, 999.0]))
    assert out_long.shape == x.shape
    torch.testing.assert_close(out_long, out_float)
    # A scalar timestep broadcasts over the batch.
    torch.testing.assert_close(net(x, torch.tensor(10))[1], out_long[1])


def test_output_is_zero_at_init() -> None:
    net = UNet(UNetConfig(base_channels=16, groups=4))
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([1, 500]))
    assert torch.count_nonzero(out) == 0


def test_class_labels_change_output_and_none_means_null_label(net: UNet) -> None:
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    out0 = net(x, t, torch.tensor([0, 0]))
    out1 = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(out0, out1)
    assert net.null_label == 3
    null = torch.full((2,), net.null_label)
    torch.testing.assert_close(net(x, t, None), net(x, t, null))
    assert not torch.allclose(net(x, t, null), out0)


def test_unconditional_net_rejects_labels() -> None:
    net = UNet(UNetConfig(base_channels=16, groups=4))
    assert net.null_label is None
    with pytest.raises(ValueError, match="class_labels"):
        net(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 18),  # not divisible by 2**(3-1)
        ("attention_resolutions", (5,)),
        ("groups", 5),
        ("num_heads", 3),
        ("base_channels", 0),
        ("dropout", 1.5),
        ("num_classes", 0),
        ("time_conditioning", "film"),
    ],
)
def test_config_validation_names_field_and_value(field: str, value: object) -> None:
    with pytest.raises(
        ValueError, match=rf"{field}={value!r}".replace("(", r"\(").replace(")", r"\)")
    ):
        UNetConfig(**{field: value})  # type: ignore[arg-type]


def test_config_round_trips_through_json() -> None:
    cfg = UNetConfig(channel_mult=(1, 2), attention_resolutions=(8, 16), num_classes=10)
    restored = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert isinstance(restored.channel_mult, tuple)
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "widht": 3})


def test_channels_last_matches_contiguous(net: UNet) -> None:
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 2])
    expected = net(x, t, y)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_additive_time_conditioning_and_bf16_autocast() -> None:
    net = UNet(UNetConfig(base_channels=16, groups=4, time_conditioning="additive", num_heads=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 16, 16)


def test_gradient_reaches_every_parameter(net: UNet) -> None:
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 3])
    net(x, t, y).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    # Embedding rows of unused classes get no gradient; the table as a whole must.
    assert missing == []


@pytest.mark.parametrize("num_classes", [None, 10])
def test_one_timestep_row_equals_a_full_batch_of_it(num_classes):
    """Samplers pass one timestep row for the whole batch; it must equal the expanded [B] form."""
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            image_size=8,
            base_channels=16,
            channel_mult=(1, 2),
            attention_resolutions=(4,),
            num_classes=num_classes,
        )
    ).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    x = torch.randn(5, 1, 8, 8)
    labels = torch.arange(5) if num_classes else None
    full = net(x, torch.full((5,), 417), labels)
    for t in (torch.tensor([417]), torch.tensor(417)):
        torch.testing.assert_close(net(x, t, labels), full, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(net(x, torch.full((5,), 10), labels), full)
