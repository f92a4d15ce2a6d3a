"""The FID feature extractor: torch-fidelity's InceptionV3 with labelled, safely loaded weights.

Its standard weights (pt_inception-2015-12-05, sha256 6726825d...) make FIDs comparable with published
ones; when they cannot be had, a seeded, He-initialised stand-in of the same architecture keeps the
pipeline running, labelled as NOT comparable with published FIDs.

Weights are untrusted bytes: they are only ever read with `torch.load(weights_only=True)`.
torch-fidelity's own loader (`torch.load(path, weights_only=False)`) only ever sees an empty,
in-memory checkpoint that we serialized ourselves.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from tasks import layout
from tasks.config import EvalConfig
from tasks.records import ExtractorRecord, Provenance
from tasks.storage import Store, atomic_local_file, sha256_file

log = logging.getLogger(__name__)

STANDARD_WEIGHTS_URL = URL_INCEPTION_V3
STANDARD_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]
# torch.hub's naming convention: the 8 hex digits before the extension are the sha256 prefix of
# the file (`load_state_dict_from_url(check_hash=True)` checks exactly this). The full digest is
# published nowhere we can pin, so the prefix is the check.
STANDARD_SHA256_PREFIX = "6726825d"
STANDARD_STORE_KEY = layout.extractor(STANDARD_FILENAME)
DOWNLOAD_TIMEOUT_S = 20.0
FEATURES = ("2048", "logits_unbiased")


@dataclass(frozen=True)
class ExtractorInfo:
    """A resolved feature extractor: its weights file on local disk and what it is."""

    path: Path
    sha256: str
    standard: bool
    label: str
    source: str

    def to_record(self) -> ExtractorRecord:
        return ExtractorRecord(
            label=self.label, weights_sha256=self.sha256, standard=self.standard, source=self.source
        )


def provenance(devices: set[str]) -> Provenance:
    """What else produced an evaluation besides its extractor: package version and git commit,
    torch, torch-fidelity, and the device kind(s) the features were extracted on."""
    try:
        package = version("diffusion-pipeline")
    except PackageNotFoundError:
        package = "unknown"
    return Provenance(
        package_version=package,
        git_commit=_git_commit(),
        torch=torch.__version__,
        torch_fidelity=str(torch_fidelity.__version__),
        device=", ".join(sorted(devices)) or "cpu",
    )


def _git_commit() -> str | None:
    """The checkout's commit (with `-dirty` when tracked files differ from it); None outside git
    (an installed wheel, Ray's py_modules copy, an image without .git)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--"], cwd=here, capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


# -- weights: where they come from --------------------------------------------------------------
def default_cache_dir() -> Path:
    """torch.hub's checkpoint folder, where torch-fidelity's own download lands too."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _write_local_atomic(path: Path, data: bytes) -> None:
    with atomic_local_file(path) as f:
        f.write(data)


def _download(url: str, dst: Path, timeout: float) -> None:
    """Plain HTTP(S) download with a socket timeout (torch.hub's has none and can hang offline)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
    _write_local_atomic(dst, data)


def _describe(path: Path, source: str, sha: str | None = None) -> ExtractorInfo:
    sha = sha or sha256_file(path)
    standard = sha.startswith(STANDARD_SHA256_PREFIX)
    if standard:
        label = "inception-v3-compat (standard weights)"
    else:
        label = (
            f"inception-v3-compat custom weights sha256={sha[:16]} "
            "(not comparable with published FID)"
        )
    return ExtractorInfo(path=path, sha256=sha, standard=standard, label=label, source=source)


def _fetch_configured(location: str, store: Store, cache: Path) -> tuple[Path, str]:
    """`evaluate.inception_weights` -> a local file.

    Accepts a path, a file:// URL, the store's (or another fsspec) URL, or an http(s) URL.
    """
    scheme = location.split("://", 1)[0] if "://" in location else ""
    if scheme in ("", "file"):
        path = Path(location[len("file://") :] if scheme else location).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.inception_weights={location!r}: no such file")
        return path, location
    name = location.rstrip("/").rsplit("/", 1)[-1] or "inception-weights.pth"
    if scheme in ("http", "https"):
        dst = cache / name
        if not dst.is_file():
            log.info("downloading Inception weights %s", location)
            _download(location, dst, DOWNLOAD_TIMEOUT_S)
        return dst, location
    fs = store.fs if scheme == store.protocol else fsspec.filesystem(scheme)
    try:
        data = fs.cat_file(location)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"evaluate.inception_weights={location!r}: no such object"
        ) from None
    dst = cache / f"{hashlib.sha256(data).hexdigest()[:16]}-{name}"
    if not dst.is_file():
        _write_local_atomic(dst, data)
    return dst, location


def _find_standard(store: Store, cache: Path, url: str) -> tuple[ExtractorInfo | None, str]:
    """Standard weights from the local cache, the store or `url`: (extractor or None, reason)."""
    local = cache / STANDARD_FILENAME
    if local.is_file():
        sha = sha256_file(local)
        if sha.startswith(STANDARD_SHA256_PREFIX):
            return _describe(local, str(local), sha), ""
    if store.exists(STANDARD_STORE_KEY):
        _write_local_atomic(local, store.read_bytes(STANDARD_STORE_KEY))
        return _describe(local, store.url(STANDARD_STORE_KEY)), ""
    try:
        _download(url, local, DOWNLOAD_TIMEOUT_S)
    except OSError as err:  # URLError, timeouts, refused connections
        return None, f"download of {url} failed: {err}"
    info = _describe(local, url)
    if not info.standard:
        local.unlink()
        return None, (
            f"{url} did not serve the standard file "
            f"(its sha256 does not start with {STANDARD_SHA256_PREFIX})"
        )
    return info, ""


def _missing_weights_message(reason: str, store: Store) -> str:
    return (
        f"the standard FID Inception weights are not available ({reason}). "
        f"On a machine with internet, download {STANDARD_WEIGHTS_URL} "
        f"(its sha256 starts with {STANDARD_SHA256_PREFIX}); then either put the file where every "
        "worker can read it and set evaluate.inception_weights=PATH, or upload it to the object "
        f"store as {store.url(STANDARD_STORE_KEY)} (found there automatically; an s3:// URL in "
        "evaluate.inception_weights works too). To go on without them, set "
        "evaluate.on_missing_weights=stand-in: the FID is then computed with a seeded stand-in "
        "extractor and is not comparable with published FIDs."
    )


def resolve_extractor(
    cfg: EvalConfig,
    store: Store,
    *,
    cache_dir: Path | None = None,
    standard_url: str = STANDARD_WEIGHTS_URL,
) -> ExtractorInfo:
    """Find the extractor weights.

    Order: `cfg.inception_weights`; else the standard weights from the local cache, the store's
    `extractors/` or `standard_url` (20 s timeout); else, per `cfg.on_missing_weights`, a
    RuntimeError saying how to provide them or the seeded stand-in (loudly logged).
    """
    cache = cache_dir or default_cache_dir()
    if cfg.inception_weights:
        return _describe(*_fetch_configured(cfg.inception_weights, store, cache))
    standard, reason = _find_standard(store, cache, standard_url)
    if standard is not None:
        return standard
    if cfg.on_missing_weights == "error":
        raise RuntimeError(_missing_weights_message(reason, store))
    log.warning(
        "!!! standard FID Inception weights unavailable (%s): using a seeded STAND-IN "
        "extractor (seed=%d). FID/KID/IS from it are NOT comparable with published numbers. %s",
        reason,
        cfg.standin_seed,
        "Set evaluate.inception_weights to fix this.",
    )
    return _standin(cfg.standin_seed, store, cache)


# -- the network --------------------------------------------------------------------------------
class _InceptionV3Compat(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 (same layers, same forward) without its unsafe loader.

    Its constructor `torch.load`s the weights with weights_only=False; we give it an empty
    checkpoint serialized here, skip that load, and load the real weights afterwards, safely.
    """

    def __init__(self) -> None:
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        super().__init__(
            "inception-v3-compat", list(FEATURES), feature_extractor_weights_path=empty
        )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if not state_dict:  # the constructor's empty checkpoint; a real load is strict below
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def load_weights_safely(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict of tensors via torch.load(weights_only=True); anything else is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not a plain tensor checkpoint
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"refusing Inception weights file {str(path)!r}: it is not a plain tensor checkpoint "
            f"that torch.load(weights_only=True) accepts ({type(err).__name__}: {first_line})"
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
    ):
        raise ValueError(
            f"refusing Inception weights file {str(path)!r}: expected a state_dict of tensors, "
            f"got {type(obj).__name__}"
        )
    return obj


@functools.lru_cache(maxsize=2)
def _load_extractor(path: str, sha256: str, device: str) -> _InceptionV3Compat:
    del sha256  # part of the cache key only: same bytes, same module
    model = _InceptionV3Compat()
    try:
        model.load_state_dict(load_weights_safely(Path(path)))
    except RuntimeError as err:
        raise ValueError(
            f"Inception weights file {path!r} does not fit torch-fidelity's InceptionV3: {err}"
        ) from None
    return model.to(device).eval()


def load_extractor(info: ExtractorInfo, device: str = "cpu") -> torch.nn.Module:
    """The extractor module for `info`, built once per process and device."""
    return _load_extractor(str(info.path), info.sha256, str(device))


def _standin_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """He-initialised InceptionV3 weights from one seed; BatchNorm at identity.

    PyTorch's default init (kaiming_uniform with a=sqrt(5), i.e. gain 1/sqrt(3)) shrinks the
    activations by ~3x per conv; over InceptionV3's depth the pool features vanish and every FID is
    ~1e-13. He init (fan_in, ReLU gain) keeps the activation scale through the depth.
    """
    model = _InceptionV3Compat()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                torch.nn.init.kaiming_normal_(
                    module.weight, mode="fan_in", nonlinearity="relu", generator=g
                )
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _standin(seed: int, store: Store, cache: Path) -> ExtractorInfo:
    """The stand-in lives in the store: every worker and run uses the same bytes and sha256."""
    key = layout.extractor(f"inception-v3-standin-seed{seed}.pth")
    sha_key = layout.extractor(f"inception-v3-standin-seed{seed}.pth.sha256")
    known_sha = store.read_bytes(sha_key).decode().strip() if store.exists(sha_key) else None
    if known_sha:
        local = cache / f"inception-v3-standin-seed{seed}-{known_sha[:16]}.pth"
        if local.is_file() and sha256_file(local) == known_sha:
            return _standin_info(local, known_sha, seed, store.url(key))
    if store.exists(key):
        data = store.read_bytes(key)
    else:
        log.info(
            "building the stand-in extractor (seed=%d) and caching it at %s", seed, store.url(key)
        )
        buf = io.BytesIO()
        torch.save(_standin_state_dict(seed), buf)
        data = buf.getvalue()
        store.write_bytes(key, data)
    sha = hashlib.sha256(data).hexdigest()
    if sha != known_sha:
        store.write_text(sha_key, sha + "\n")
    local = cache / f"inception-v3-standin-seed{seed}-{sha[:16]}.pth"
    if not local.is_file():
        _write_local_atomic(local, data)
    return _standin_info(local, sha, seed, store.url(key))


def _standin_info(path: Path, sha: str, seed: int, source: str) -> ExtractorInfo:
    label = f"inception-v3-compat STAND-IN seed={seed} (not comparable with published FID)"
    return ExtractorInfo(path=path, sha256=sha, standard=False, label=label, source=source)


# -- features and statistics ---------------------------------------------------------------------
def extract_features(
    images_uint8: np.ndarray, extractor: ExtractorInfo, batch_size: int, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """uint8 [N, C, H, W], C in (1, 3) -> {"2048": [N, 2048], "logits_unbiased": [N, 1008]} float64.

    The extractor resizes to 299x299 itself (TF1-compatible bilinear); grayscale is repeated to RGB.
    """
    if (
        images_uint8.dtype != np.uint8
        or images_uint8.ndim != 4
        or images_uint8.shape[1] not in (1, 3)
    ):
        raise ValueError(
            "extract_features needs uint8 [N, C, H, W] with C in (1, 3), "
            f"got {images_uint8.dtype} {images_uint8.shape}"
        )
    model = load_extractor(extractor, device)
    out: dict[str, list[np.ndarray]] = {name: [] for name in FEATURES}
    start = time.monotonic()
    with torch.inference_mode():
        for lo in range(0, len(images_uint8), batch_size):
            x = torch.from_numpy(np.array(images_uint8[lo : lo + batch_size], copy=True)).to(device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            for name, value in zip(FEATURES, model(x), strict=True):
                out[name].append(value.double().cpu().numpy())
    log.info(
        "extracted features of %d images in %.1fs", len(images_uint8), time.monotonic() - start
    )
    return {name: np.concatenate(parts) for name, parts in out.items()}
