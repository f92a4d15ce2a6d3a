"""Image files for the shard stage: what the driver lists, and what a shard task reads and checks.

`imagefolder:URL` names a local folder or `s3://bucket/prefix/` with one subfolder per class, or a
JSONL/CSV listing of (url, label) rows. The driver streams the listing (keys, sizes, etags or
mtimes: never an image) in a fixed order; a shard task reads, decodes, checks and encodes the
images of its chunk. The in-memory datasets (digits, MNIST, CIFAR-10) are `tasks.shard.datasets`'.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from PIL import Image

from tasks.config import StorageConfig, resolve_storage
from tasks.records import SkippedFile
from tasks.retry import retry_transient
from tasks.storage import Store, open_store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LISTING_SUFFIXES = (".jsonl", ".csv")
# What PIL may open: image formats only (PIL would also run Ghostscript on EPS, for example).
_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
_S3_PAGE = 1000  # keys per listing request: what the driver holds of a listing at a time
_S3_BATCH = 32  # images a shard task fetches from S3 at once


class Item(NamedTuple):
    """One image as listed: enough to name it, split it, chunk it and notice that it changed. A
    tuple, so that the chunks the driver sends to its shard tasks pickle cheaply."""

    key: str  # path below the source root (a listing's url as written; an array index)
    label: int
    size: int  # bytes; 0 when unknown
    version: str  # S3 ETag or local mtime in ns (a listing's etag column); arrays: pixel hash


class BadImageError(ValueError):
    """An image a shard task cannot use; the message says why, the caller names the file."""


@dataclass(frozen=True)
class FileSource:
    """A resolved `imagefolder:` source. Picklable: shard tasks get it whole."""

    url: str  # the folder or the listing, absolute (messages, and the shard set's identity)
    root: StorageConfig  # the folder holding the images (a listing's own folder)
    listing: str | None  # the listing's key below `root`; None for a tree of class folders
    name: str  # the dataset name, key-safe
    s3: StorageConfig  # endpoint, region and retry budget for absolute s3:// urls of a listing


def _slug(text: str) -> str:
    """A name that can be part of a storage key: other characters than letters, digits, '.',
    '_', '-' become '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "root"


def file_source(spec: str, storage: StorageConfig) -> FileSource:
    """Resolve `spec` (what follows `imagefolder:`) with the endpoint, region and retry budget of
    `storage` (the store's settings); a missing local folder or listing fails here."""
    is_listing = spec.lower().endswith(LISTING_SUFFIXES)
    # An S3 store lends its endpoint and region; beside a local store they come from the environment.
    s3 = storage if not storage.is_local else StorageConfig(root="s3://template")
    s3 = resolve_storage(s3.model_copy(update={"retry_budget_s": storage.retry_budget_s}))
    if spec.startswith("s3://"):
        base = spec.rstrip("/")
        folder, _, leaf = base.rpartition("/") if is_listing else (base, "", "")
        if folder in ("s3:", "s3:/"):
            raise ValueError(f"imagefolder {spec!r} names no bucket; use s3://bucket/prefix/")
        root = s3.model_copy(update={"root": folder})
        name = Path(leaf).stem if is_listing else base.rsplit("/", 1)[-1]
        url = base
    else:
        path = Path(spec.removeprefix("file://")).expanduser().absolute()
        if is_listing and not path.is_file():
            raise FileNotFoundError(f"imagefolder listing {str(path)!r} is not a file")
        if not is_listing and not path.is_dir():
            raise FileNotFoundError(f"imagefolder {str(path)!r} is not a directory")
        folder_path = path.parent if is_listing else path
        root = resolve_storage(StorageConfig(root=str(folder_path)))
        name, leaf, url = (path.stem if is_listing else path.name), path.name, str(path)
    return FileSource(
        url=url,
        root=root,
        listing=leaf if is_listing else None,
        name=f"imagefolder-{_slug(name)}",
        s3=s3,
    )


def _s3_objects(store: Store, prefix: str, delimiter: str = "") -> Iterator[dict[str, Any]]:
    """The objects (or, with a delimiter, the sub-folders) below `prefix`, a page at a time, in
    the store's key order; each page is retried under the store's budget."""
    bucket, _, below = store.root_path.partition("/")
    full = f"{below}/{prefix}" if below else prefix
    token: str | None = None
    while True:
        args = {"Bucket": bucket, "Prefix": full, "MaxKeys": _S3_PAGE}
        args |= {"Delimiter": delimiter} if delimiter else {}
        args |= {"ContinuationToken": token} if token else {}
        page: dict[str, Any] = retry_transient(
            functools.partial(store.fs.call_s3, "list_objects_v2", **args),
            budget_s=store.config.retry_budget_s,
            what=f"listing {store.url(prefix)}",
        )
        cut = len(full) - len(prefix)
        for entry in page.get("CommonPrefixes", []) if delimiter else page.get("Contents", []):
            key = entry["Prefix"] if delimiter else entry["Key"]
            yield {**entry, "key": key[cut:]}
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def _class_folders(store: Store) -> list[str]:
    if store.is_local:
        with os.scandir(store.root_path) as entries:
            names = [e.name for e in entries if e.is_dir()]
    else:
        names = [e["key"].rstrip("/") for e in _s3_objects(store, "", delimiter="/")]
    return sorted(n for n in names if not n.startswith("."))


def _files(store: Store, folder: str) -> Iterator[tuple[str, int, str]]:
    """(key, size, version) of every file below `folder`, recursively, in a fixed order. Locally
    one directory's names are held at a time (sorted: the OS's order is not stable)."""
    if not store.is_local:
        for entry in _s3_objects(store, f"{folder}/"):
            if not entry["key"].endswith("/"):  # folder markers some tools create
                yield entry["key"], int(entry["Size"]), str(entry["ETag"]).strip('"')
        return
    directory = store.path(folder)  # checked once; the names below come from the OS
    for name in sorted(os.listdir(directory)):
        if name.startswith("."):
            continue
        st = os.stat(f"{directory}/{name}")
        if stat.S_ISDIR(st.st_mode):
            yield from _files(store, f"{folder}/{name}")
        elif stat.S_ISREG(st.st_mode):
            yield f"{folder}/{name}", st.st_size, str(st.st_mtime_ns)


@dataclass
class Listing:
    """Streams a file source's images in a fixed order (class folders sorted, then the files below
    each one; a listing's rows in their order). While it runs it learns the class names and the
    class folders it skipped; `ignored` counts files that are not images."""

    source: FileSource
    on_empty_class: Literal["fail", "skip"]
    class_names: list[str] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored: int = 0

    def __iter__(self) -> Iterator[Item]:
        store = open_store(self.source.root)
        if self.source.listing is not None:
            yield from self._rows(store, self.source.listing)
            return
        folders = _class_folders(store)
        if not folders:
            raise ValueError(
                f"imagefolder {self.source.url!r} has no class subfolders; put the images in "
                f"{self.source.url}/<class>/*.png"
            )
        for folder in folders:
            label, count = len(self.class_names), 0
            for key, size, version in _files(store, folder):
                if not key.lower().endswith(IMAGE_SUFFIXES):
                    self.ignored += 1
                    continue
                if count == 0:
                    self.class_names.append(folder)
                count += 1
                yield Item(key, label, size, version)
            if count == 0:
                self._empty_class(folder)

    def _empty_class(self, folder: str) -> None:
        if self.on_empty_class == "fail":
            raise ValueError(
                f"imagefolder {self.source.url!r}: class folder {folder!r} holds no images "
                f"({', '.join(IMAGE_SUFFIXES)}); add images, remove the folder, or set "
                "data.on_empty_class=skip"
            )
        self.skipped.append(SkippedFile(path=f"{folder}/", reason="empty class folder"))

    def _rows(self, store: Store, key: str) -> Iterator[Item]:
        """A JSONL ({"url": ..., "label": ...} per line) or CSV (header `url,label`) listing, read
        twice as a stream: once for the class names (the sorted labels), once for the items.
        Optional `size` and `etag` columns let a rerun see that an image changed."""
        labels = sorted({row["label"] for row in self._read_rows(store, key)})
        self.class_names = labels
        index = {name: i for i, name in enumerate(labels)}
        for row in self._read_rows(store, key):
            yield Item(row["url"], index[row["label"]], int(row["size"]), row["etag"])

    def _read_rows(self, store: Store, key: str) -> Iterator[dict[str, str]]:
        where = f"listing {store.url(key)}"
        with store.open_read(key) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            if key.lower().endswith(".csv"):
                rows: Iterator[dict[str, Any]] = csv.DictReader(text)
            else:
                rows = (json.loads(line) for line in text if line.strip())
            for n, row in enumerate(rows, start=1):
                if (
                    not isinstance(row, dict)
                    or not row.get("url")
                    or row.get("label")
                    in (
                        None,
                        "",
                    )
                ):
                    raise ValueError(
                        f"{where}, row {n}: needs a url and a label, got {row!r}; write one "
                        'row per image: {"url": "cats/1.png", "label": "cats"} (or CSV url,label)'
                    )
                if not str(row["url"]).lower().endswith(IMAGE_SUFFIXES):
                    raise ValueError(
                        f"{where}, row {n}: {row['url']!r} is not an image file "
                        f"({', '.join(IMAGE_SUFFIXES)})"
                    )
                yield {
                    "url": str(row["url"]),
                    "label": str(row["label"]),
                    "size": str(row.get("size") or 0),
                    "etag": str(row.get("etag") or ""),
                }


def read_image_bytes(source: FileSource, key: str) -> bytes:
    """The bytes of the image `key` of `source`: a path below its root, or (in a listing) an
    absolute path or s3:// url."""
    if key.startswith("s3://"):
        bucket, _, below = key.removeprefix("s3://").partition("/")
        store = open_store(source.s3.model_copy(update={"root": f"s3://{bucket}"}))
        return store.read_bytes(below)
    if key.startswith("/") or key.startswith("file://"):
        with open(key.removeprefix("file://"), "rb") as f:
            return f.read()
    store = open_store(source.root)
    if store.is_local:  # the common case, without fsspec's per-call overhead
        with open(store.path(key), "rb") as f:
            return f.read()
    return store.read_bytes(key)


def iter_image_bytes(
    source: FileSource, keys: Sequence[str], batch: int = _S3_BATCH
) -> Iterator[bytes | FileNotFoundError]:
    """The bytes of each of `keys` in order (a FileNotFoundError for a file gone since the
    listing). From S3, `batch` objects are fetched at once (the requests overlap; a batch is
    retried whole under the store's budget), so a task waits on the store once per batch."""
    store = open_store(source.root)
    if store.is_local:
        for key in keys:
            try:
                if key.startswith("s3://"):
                    yield read_image_bytes(source, key)
                    continue
                absolute = key.startswith(("/", "file://"))
                with open(key.removeprefix("file://") if absolute else store.path(key), "rb") as f:
                    yield f.read()
            except FileNotFoundError as err:
                yield err
        return
    for start in range(0, len(keys), batch):
        part = keys[start : start + batch]
        if any(k.startswith(("s3://", "/", "file://")) for k in part):  # a listing's urls
            for key in part:
                try:
                    yield read_image_bytes(source, key)
                except FileNotFoundError as err:
                    yield err
            continue
        paths = [store.path(k) for k in part]
        got = retry_transient(
            functools.partial(_cat, store, paths),
            budget_s=store.config.retry_budget_s,
            what=f"reading {len(paths)} images below {store.url('')}",
        )
        yield from (got[path] for path in paths)


def _cat(store: Store, paths: list[str]) -> dict[str, bytes | FileNotFoundError]:
    """Fetch `paths` at once; a missing object is returned as its error, any other raised (so
    that a transient one is retried)."""
    got = store.fs.cat(paths, on_error="return")
    out: dict[str, bytes | FileNotFoundError] = {}
    for path in paths:
        value = got.get(path, FileNotFoundError(path))
        if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
            raise value
        out[path] = value if isinstance(value, FileNotFoundError) else bytes(value)
    return out


def source_url(source: FileSource, key: str) -> str:
    """Where `key` of `source` is, for messages."""
    if key.startswith(("s3://", "/", "file://")):
        return key
    return f"{source.root.root.rstrip('/')}/{key}"


def prepare_image(data: bytes, channels: int, image_size: int | None) -> tuple[bytes, int]:
    """An image file's bytes -> (PNG bytes for a shard, its side length in pixels).

    Decoded in full (a truncated file fails here, not in training), converted to grayscale (1
    channel) or RGB (3), and resized to `image_size` squared when set (PIL filters over the whole
    footprint when it shrinks: antialiased). A PNG already in the right mode and size is kept
    byte for byte. Raises BadImageError with the reason."""
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as im:
            im.load()
            width, height = im.size
            if image_size is None and width != height:
                raise BadImageError(
                    f"is not square ({width}x{height}); set data.image_size to resize every image"
                )
            if image_size is None and im.format == "PNG" and im.mode == mode:
                return data, width
            out = im if im.mode == mode else im.convert(mode)
            if image_size is not None and out.size != (image_size, image_size):
                out = out.resize((image_size, image_size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            out.save(buf, format="PNG", compress_level=1)
            return buf.getvalue(), out.size[0]
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot be decoded ({type(err).__name__}: {err})") from None
