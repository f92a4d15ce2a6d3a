"""In-memory image sources: the built-in `digits` set (ships with scikit-learn, no network), and MNIST /
Fashion-MNIST / CIFAR-10 from a local root in torchvision's layout.

Each loader returns the whole source as uint8 [N, C, H, W] plus int labels; sharding cuts it up.
These datasets are bounded (at most 70,000 small images); `imagefolder:` sources of any size are
streamed file by file instead (`tasks.shard.sources`).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config import DATASET_CHOICES, DataConfig, StorageConfig


@dataclass(frozen=True)
class Source:
    name: str
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]


def _digits() -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1797 images, 8x8, intensities 0..16, bundled with scikit-learn
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return Source("digits", images, d.target.astype(np.int64), [str(i) for i in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (MNIST's format), gzip or plain; no pickle involved."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_files(name: str, folder_name: str, cfg: DataConfig) -> tuple[Path, Path] | None:
    """The IDX image and label files of an MNIST-like dataset under `data.root`, or None."""
    if cfg.root is None:
        raise ValueError(
            f"dataset {name!r} needs data.root: a folder holding {folder_name}/raw/ (torchvision's layout)"
        )
    root = Path(cfg.root).expanduser()
    prefix = "train" if cfg.source_split == "train" else "t10k"
    for folder in [root / folder_name / "raw", root / folder_name, root]:
        img = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        lab = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if img and lab:
            return img, lab
    return None


def _missing_mnist(name: str, folder_name: str, cfg: DataConfig) -> FileNotFoundError:
    root = Path(cfg.root or ".").expanduser()
    prefix = "train" if cfg.source_split == "train" else "t10k"
    searched = [root / folder_name / "raw", root / folder_name, root]
    return FileNotFoundError(
        f"dataset {name!r}: no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] in "
        f"{', '.join(str(p) for p in searched)}; place the files there or set data.download=true (needs network)"
    )


_MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def check_source(cfg: DataConfig) -> None:
    """Fail in milliseconds, before any service starts, when the configured source cannot be read
    (missing files or folders); reading and validating the images is the shard stage's job."""
    name = cfg.dataset
    if name in _MNIST_FOLDERS:
        if _mnist_files(name, _MNIST_FOLDERS[name], cfg) is None and not cfg.download:
            raise _missing_mnist(name, _MNIST_FOLDERS[name], cfg)
    elif name == "cifar10":
        if cfg.root is None:
            raise ValueError(
                "dataset 'cifar10' needs data.root: the folder holding cifar-10-batches-py/"
            )
        folder = Path(cfg.root).expanduser() / "cifar-10-batches-py"
        if not folder.is_dir() and not cfg.download:
            raise FileNotFoundError(f"dataset 'cifar10': {folder} is not a directory")
    elif name.startswith("imagefolder:"):
        spec = name.split(":", 1)[1]
        if not spec.startswith("s3://"):  # an S3 source is checked with the store's settings
            from tasks.shard.sources import file_source

            file_source(spec, StorageConfig())


def _mnist_like(name: str, folder_name: str, cfg: DataConfig, class_names: list[str]) -> Source:
    files = _mnist_files(name, folder_name, cfg)
    if files is not None:
        img, lab = files
        return Source(name, _read_idx(img)[:, None], _read_idx(lab).astype(np.int64), class_names)
    root = Path(cfg.root or ".").expanduser()
    if cfg.download:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        ds = cls(str(root), train=cfg.source_split == "train", download=True)
        return Source(
            name, ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64), class_names
        )
    raise _missing_mnist(name, folder_name, cfg)


def _cifar10(cfg: DataConfig) -> Source:
    import torchvision

    if cfg.root is None:
        raise ValueError(
            "dataset 'cifar10' needs data.root: the folder holding cifar-10-batches-py/"
        )
    # torchvision verifies the batch files' published md5 before it unpickles them.
    try:
        ds = torchvision.datasets.CIFAR10(
            cfg.root, train=cfg.source_split == "train", download=cfg.download
        )
    except RuntimeError as err:
        raise FileNotFoundError(
            f"dataset 'cifar10': {err} (looked in {cfg.root}/cifar-10-batches-py; set data.download=true when online)"
        ) from None
    return Source(
        "cifar10",
        ds.data.transpose(0, 3, 1, 2).copy(),
        np.asarray(ds.targets, dtype=np.int64),
        list(ds.classes),
    )


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    mode = "L" if images.shape[1] == 1 else "RGB"
    out = []
    for im in images:
        pil = Image.fromarray(im[0] if mode == "L" else im.transpose(1, 2, 0), mode=mode)
        arr = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
        out.append(arr[None] if mode == "L" else arr.transpose(2, 0, 1))
    return np.stack(out)


def load_source(cfg: DataConfig) -> Source:
    """The configured in-memory dataset, resized, capped and converted to `data.channels` as
    configured."""
    name = cfg.dataset
    if name == "digits":
        src = _digits()
    elif name == "mnist":
        src = _mnist_like("mnist", "MNIST", cfg, [str(i) for i in range(10)])
    elif name == "fashion-mnist":
        names = [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ]
        src = _mnist_like("fashion-mnist", "FashionMNIST", cfg, names)
    elif name == "cifar10":
        src = _cifar10(cfg)
    else:  # the config validator already refuses this; imagefolder: is tasks.shard.sources'
        raise ValueError(f"dataset {name!r} unknown; choose one of: {DATASET_CHOICES}")
    images, labels = src.images, src.labels
    if cfg.max_images is not None and len(images) > cfg.max_images:
        images, labels = images[: cfg.max_images], labels[: cfg.max_images]
    if cfg.image_size is not None:
        images = _resize(images, cfg.image_size)
    if cfg.channels == 3 and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    elif cfg.channels == 1 and images.shape[1] == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
        rgb = [Image.fromarray(im.transpose(1, 2, 0)).convert("L") for im in images]
        images = np.stack([np.asarray(im, dtype=np.uint8)[None] for im in rgb])
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"dataset {name!r} has non-square images {images.shape[-2:]}; set data.image_size"
        )
    return Source(src.name, images, labels, src.class_names)
