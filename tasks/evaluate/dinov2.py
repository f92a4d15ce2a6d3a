"""FD-DINOv2: the Fréchet distance (as FID's) on DINOv2 ViT-S/14 features, through torch-fidelity's
"dinov2-vit-s-14" extractor (Stein et al. 2023 found it agrees better with human judgement than
Inception's).

torch-fidelity 0.4 builds that extractor only by downloading: `torch.hub.load("facebookresearch/dinov2",
...)` fetches code and weights from GitHub, and a weights path raises NotImplementedError. Here
nothing is downloaded: with `evaluate.dinov2_weights` (a path, or a URL in the store) and the
hub code in torch.hub's folder (`facebookresearch_dinov2_main`, where a machine with internet puts it),
the network is built from that code, its weights are loaded with `weights_only=True`, and
torch-fidelity's own preprocessing and forward run (TF1-compatible resize to 224, ImageNet
normalisation). Without them the metric is skipped with one line, in the log and the report.

The features are extracted in the driver (one model load), per repeat and for the held-out images
of the FID reference: fine for the sizes FD-DINOv2 is asked for; it is not cached.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
from pathlib import Path
from typing import TypedDict

import fsspec
import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA, FeatureExtractorDinoV2

from diffusion_core.fid import feature_moments, frechet_distance
from tasks.config import EvalConfig
from tasks.records import DatasetManifest, SampleSet
from tasks.storage import Store
from tasks.webdata import decode_sample, iter_raw_samples

log = logging.getLogger(__name__)

NAME = "dinov2-vit-s-14"
HUB_REPO_DIR = "facebookresearch_dinov2_main"  # torch.hub's folder name for the GitHub repo


class DinoFields(TypedDict, total=False):
    fd_dinov2s: list[float]
    fd_dinov2: float | None
    fd_dinov2_std: float | None
    dinov2_weights_sha256: str | None


def hub_code_dir() -> Path:
    return Path(torch.hub.get_dir()) / HUB_REPO_DIR


def skip_reason(cfg: EvalConfig) -> str | None:
    """Why FD-DINOv2, asked for in `evaluate.metrics`, cannot be computed here (None: it can, or
    it was not asked for)."""
    if "fd_dinov2" not in cfg.metrics:
        return None
    if not cfg.dinov2_weights:
        return (
            "FD-DINOv2 skipped: evaluate.dinov2_weights is not set (torch-fidelity would download "
            "DINOv2 from GitHub; nothing is downloaded here)"
        )
    if not (hub_code_dir() / "hubconf.py").is_file():
        return (
            f"FD-DINOv2 skipped: facebookresearch/dinov2's hub code is not in {hub_code_dir()} "
            "(copy it there from a machine where torch.hub.load('facebookresearch/dinov2', "
            "'dinov2_vits14') ran)"
        )
    return None


class _DinoV2(FeatureExtractorDinoV2):
    """torch-fidelity's DINOv2 extractor (its preprocessing and forward) on local code and
    weights: its own constructor only downloads."""

    def __init__(self, code_dir: Path, weights: dict[str, torch.Tensor]) -> None:
        FeatureExtractorBase.__init__(self, NAME, ["dinov2"])
        self.feature_extractor_internal_dtype = torch.float32
        self.model = torch.hub.load(
            str(code_dir), MODEL_METADATA[NAME], source="local", pretrained=False
        )
        self.model.load_state_dict(weights)
        self.requires_grad_(False)
        self.eval()


def _read_weights(location: str, store: Store) -> bytes:
    scheme = location.split("://", 1)[0] if "://" in location else ""
    if scheme in ("", "file"):
        path = Path(location.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.dinov2_weights={location!r}: no such file")
        return path.read_bytes()
    fs = store.fs if scheme == store.protocol else fsspec.filesystem(scheme)
    try:
        data: bytes = fs.cat_file(location)
    except FileNotFoundError:
        raise FileNotFoundError(f"evaluate.dinov2_weights={location!r}: no such object") from None
    return data


_LOADED: dict[tuple[str, str, str], _DinoV2] = {}  # (weights sha256, code dir, device): one load


def _load(sha256: str, data: bytes, code_dir: str, device: str) -> _DinoV2:
    """The extractor, built once per process; the weights read with weights_only=True."""
    key = (sha256, code_dir, device)
    if key not in _LOADED:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
            raise ValueError(
                f"evaluate.dinov2_weights: expected a state_dict of tensors, got {type(obj).__name__}"
            )
        _LOADED.clear()
        _LOADED[key] = _DinoV2(Path(code_dir), obj).to(device)
    return _LOADED[key]


def dinov2_features(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [N, C, H, W] (C in 1, 3) -> float64 [N, D] DINOv2 features; grayscale as RGB."""
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[lo : lo + batch_size], copy=True)).to(device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            (features,) = model(x)
            out.append(features.double().cpu().numpy())
    return np.concatenate(out)


def _images(store: Store, shards: list[tuple[str, str, int]], channels: int) -> np.ndarray:
    """uint8 [N, C, H, W]: the first `count` images of each (key, sha256, count) shard."""
    images = []
    for key, sha, count in shards:
        raw = iter_raw_samples(store, [key], {key: sha})
        images += [decode_sample(s, channels).image for s in itertools.islice(raw, count)]
        for _ in raw:  # read to the end: the shard's sha256 is checked
            pass
    return np.stack(images)


def fd_dinov2_fields(
    store: Store,
    cfg: EvalConfig,
    dataset: DatasetManifest,
    samples: SampleSet,
    num_reference: int,
) -> DinoFields:
    """FD-DINOv2 of each repeat against the first `num_reference` held-out images (the FID
    reference's), their mean and sample std. Call only when `skip_reason(cfg)` is None."""
    assert cfg.dinov2_weights is not None
    data = _read_weights(cfg.dinov2_weights, store)
    sha = hashlib.sha256(data).hexdigest()
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model = _load(sha, data, str(hub_code_dir()), device)
    held_out, left = [], num_reference
    for shard in dataset.split("holdout").shards:
        if left > 0:
            held_out.append((shard.key, shard.sha256, min(shard.count, left)))
            left -= shard.count
    reference = feature_moments(
        dinov2_features(model, _images(store, held_out, dataset.channels), cfg.batch_size)
    )
    fds = []
    for j in range(cfg.repeats):
        shards = [(s.key, s.sha256, s.count) for s in samples.repeat_shards(j)]
        images = _images(store, shards, samples.channels)
        mu, sigma = feature_moments(dinov2_features(model, images, cfg.batch_size))
        fds.append(frechet_distance(mu, sigma, *reference))
    mean = float(np.mean(fds))
    std = float(np.std(fds, ddof=1)) if len(fds) > 1 else None
    log.info("FD-DINOv2 (%s, weights sha256 %s): %s", NAME, sha[:16], fds)
    return DinoFields(fd_dinov2s=fds, fd_dinov2=mean, fd_dinov2_std=std, dinov2_weights_sha256=sha)
