"""The sampler sweep without Ray: each sampler's NFE counted on a real denoiser, the grid's checks
naming the bad value, the choice (the cheapest within the noise of the best) and its report."""

from __future__ import annotations

import re

import pytest
import torch

from diffusion_core.samplers import SAMPLERS, make_eps_denoiser, network_evaluations, sample
from diffusion_core.schedules import alpha_bar_from_betas, make_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from flows.cli import main
from tasks import layout
from tasks.config import SampleConfig, StorageConfig
from tasks.records import SamplerChoice, SampleSet
from tasks.report.choice import SAMPLER_SECTIONS, write_sampler_report
from tasks.sample.grid import (
    check_same_job,
    grid_configs,
    nfe,
    product_grid,
    sampler_choice,
    use_command,
)
from tasks.storage import Store
from tests.support.records import checkpoint_record, metrics_record


class CountingNet(torch.nn.Module):
    """Predicts zero noise and counts the images it was evaluated on."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.images += x.shape[0]
        return torch.zeros_like(x)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_network_evaluations_are_what_the_sampler_spends(name, steps, guided):
    alpha_bar = alpha_bar_from_betas(make_betas("linear", 100))
    net, batch = CountingNet(), 3
    denoiser = make_eps_denoiser(
        net,
        alpha_bar=alpha_bar,
        prediction_type="epsilon",
        class_labels=torch.zeros(batch, dtype=torch.long) if guided else None,
        guidance_scale=2.0 if guided else 1.0,
        null_label=10 if guided else None,
    )
    noise = ImageNoise(list(range(batch)))
    timesteps = make_timesteps(100, steps, "trailing")
    sample(name, denoiser, noise.randn((1, 2, 2)), timesteps, alpha_bar=alpha_bar, noise=noise)
    assert net.images == batch * network_evaluations(name, steps, guided=guided)


def test_the_grid_is_every_combination_of_the_values_given():
    grid = product_grid(["ddim", "dpmpp_2m"], [4, 8], [], [])
    assert grid == [
        {"sampler": "ddim", "steps": 4},
        {"sampler": "ddim", "steps": 8},
        {"sampler": "dpmpp_2m", "steps": 4},
        {"sampler": "dpmpp_2m", "steps": 8},
    ]
    configs = grid_configs(SampleConfig(spacing="logsnr"), grid, num_timesteps=1000)
    assert [(c.sampler, c.steps, c.spacing) for c in configs][-1] == ("dpmpp_2m", 8, "logsnr")
    assert [nfe(c) for c in configs] == [4, 8, 4, 8]
    heun = grid_configs(SampleConfig(), [{"sampler": "heun", "steps": 10, "guidance_scale": 3.0}])
    assert nfe(heun[0]) == 2 * (2 * 10 - 1)


@pytest.mark.parametrize(
    ("entry", "model", "message"),
    [
        ({"sampler": "dpm"}, {}, r"sample\.sampler='dpm'"),
        ({"spacing": "karas"}, {}, r"sample\.spacing='karas'"),
        ({"steps": 0}, {}, r"sample\.steps=0"),
        ({"steps": 1500}, {"num_timesteps": 1000}, r"steps 1500 .* 1000 training timesteps"),
        ({"guidance_scale": 3.0}, {"conditional": False}, r"guidance 3 .* class-conditional"),
        ({"sampler": "heun", "eta": 1.0}, {}, r"eta 1 applies to the ddim sampler only"),
        ({"batch_size": 8}, {}, r"sample\.batch_size cannot vary"),
    ],
)
def test_a_bad_grid_value_is_named(entry, model, message):
    with pytest.raises(ValueError, match=message):
        grid_configs(SampleConfig(), [entry], **model)


def test_a_setting_given_twice_is_refused():
    with pytest.raises(ValueError, match="ddim, 20 steps, trailing twice"):
        grid_configs(SampleConfig(), [{"steps": 20}, {"steps": 20, "sampler": "ddim"}])


def test_one_job_shares_everything_but_the_grid_fields():
    check_same_job([SampleConfig(), SampleConfig(sampler="heun", steps=5, spacing="karras")])
    with pytest.raises(ValueError, match=r"sample\.num_images differs \(128 vs 64\)"):
        check_same_job([SampleConfig(), SampleConfig(num_images=64)])


def test_the_cli_names_a_bad_value_before_anything_starts(tmp_path, capsys):
    root = f"storage.root={tmp_path}"
    assert main(["samplers", root, "--samplers", "ddim,dpm2"]) == 2
    assert "sample.sampler='dpm2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["samplers", root, "--steps", "10,2O"])
    assert "'2O' is not a whole number of steps" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was written


def _sweep(fids: dict[tuple[str, int], list[float]]) -> SamplerChoice:
    """A sweep of `fids` by (sampler, steps): hand-made sample sets and their evaluations."""
    ckpt = checkpoint_record(1)
    sets, metrics = [], []
    for (sampler, steps), values in fids.items():
        cfg = SampleConfig(sampler=sampler, steps=steps, num_images=256)  # type: ignore[arg-type]
        name = layout.sample_set_name(1, sampler, steps, f"d{steps}{sampler[:3]}")
        s = SampleSet(
            name=name,
            run_id="r",
            checkpoint=ckpt,
            weights_key="w",
            weights="ema",
            num_images=256,
            repeats=len(values),
            image_size=32,
            channels=3,
            shards=[],
            config=cfg,
            created="2026-11-25T00:00:00+00:00",
        )
        sets.append(s)
        metrics.append(
            metrics_record(values).model_copy(
                update={"samples_key": s.key, "sample_set": name, "sampling": cfg}
            )
        )
    prefix = layout.sampler_choice_prefix("r", "20261125T020000Z")
    return sampler_choice(
        sets,
        metrics,
        metric="fid",
        alpha=0.05,
        command={s.name: use_command("c.yaml", ["sample.steps=50"], s.config) for s in sets},
        stamp="20261125T020000Z",
        report_keys=(
            layout.sampler_choice_report(prefix),
            layout.sampler_choice_report_html(prefix),
        ),
        report_url="file:///x/report.html",
    )


def test_the_cheapest_setting_within_the_noise_of_the_best_is_chosen():
    choice = _sweep(
        {
            ("ddim", 50): [10.0, 12.0, 11.0],  # the best
            ("dpmpp_2m", 10): [10.8, 11.9, 11.2],  # 0.3 worse, noisily: within the noise
            ("ddim", 10): [14.0, 16.1, 15.0],  # 4 worse on every range: clearly worse
            ("heun", 20): [10.1, 12.1, 11.0],  # within the noise, but 39 NFE
        }
    )
    by_name = {s.name: s for s in choice.settings}
    assert choice.best.name == "ddim, 50 steps, trailing"
    assert choice.chosen.name == "dpmpp_2m, 10 steps, trailing" and choice.chosen.nfe == 10
    assert not by_name["ddim, 10 steps, trailing"].within_noise
    assert (
        by_name["heun, 20 steps, trailing"].within_noise
        and by_name["heun, 20 steps, trailing"].nfe == 39
    )
    assert choice.chosen.command == (
        "diffpipe nightly -c c.yaml sample.sampler=dpmpp_2m sample.steps=10 "
        "sample.spacing=trailing sample.guidance_scale=1.0 sample.eta=0.0"
    )


def test_the_sweep_report_lists_every_setting_and_the_choice(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    choice = _sweep(
        {("ddim", 50): [10.0, 12.0], ("ddim", 20): [10.2, 12.1], ("ddim", 5): [30.0, 33.0]}
    )
    document = write_sampler_report(store, choice)
    assert tuple(s.id for s in document.sections) == SAMPLER_SECTIONS
    prefix = layout.sampler_choice_prefix("r", choice.stamp)
    markdown = store.read_bytes(choice.report_key).decode()
    html = store.read_bytes(choice.report_html_key).decode()
    for s in choice.settings:
        assert s.name in markdown and s.name in html
    rows = [line for line in markdown.splitlines() if "CHOSEN" in line]
    assert len(rows) == 1 and rows[0].startswith("| ddim, 20 steps, trailing | 20 |")
    assert "![FID against NFE](fid.png)" in markdown and "data:image/png;base64," in html
    assert store.read_bytes(layout.sampler_choice_figure(prefix)).startswith(b"\x89PNG")
    assert SamplerChoice.read(store, layout.sampler_choice_record(prefix)) == choice
    assert re.search(r"Use it: diffpipe nightly .*sample\.steps=20", markdown)
