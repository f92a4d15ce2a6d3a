"""WebDataset shards in object storage: write them atomically with a checksum, read them back decoded.

Samples hold only bytes we decode ourselves (`png`, `cls`, `json`): webdataset's default decoders
would unpickle `.pkl`/`.pyd` and `torch.load` `.pth` members of an untrusted tar, so we never use them.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from tasks.records import ShardInfo
from tasks.storage import Store

ALLOWED_MEMBERS = frozenset({"png", "cls", "json"})

# A sample as webdataset's tar iterators yield it: "__key__" and "__url__" strings and one bytes
# value per member ("png", "cls", "json"). Its members are the tar's, so a dict is its true type.
RawSample = dict[str, Any]


@dataclass(frozen=True)
class DecodedSample:
    key: str
    image: np.ndarray  # uint8 [C, H, W]
    label: int | None
    meta: dict[str, object] = field(default_factory=dict)  # the sample's own JSON member


class _HashingWriter:
    """File wrapper that hashes and counts what passes through, so a shard is read once to write it."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:  # the atomic writer owns the real file
        pass


class _HashingReader:
    """Stream wrapper that hashes what is read, so a shard is checked against its sha256 in the
    same pass that reads it."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> str:
        """Read to the end (a tar's trailing blocks are never parsed) and return the sha256."""
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, C] (C in 1, 3) -> PNG bytes."""
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG bytes -> uint8 [C, H, W] with the requested channel count (1 = grayscale, 3 = RGB)."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


_BLOCK = 512
# The byte sum of a ustar header's fixed fields (the checksum field counted as 8 spaces): a
# header's checksum is this plus the sums of its name and size fields.
_HEADER_SUM = sum(
    b"0000444\x00" + b"0000000\x00" * 2 + b"00000000000\x00" + b" " * 8 + b"0" + b"ustar\x0000"
)


def _tar_header(name: str, size: int) -> bytes:
    """The header of one regular tar member: mode 0444, owner 0/0, mtime 0, so the same samples
    make the same bytes (a rewrite keeps its sha256). A plain ustar header when the name fits
    (no extended header for a float mtime, as tarfile writes for webdataset's TarWriter: half
    the bytes per member); tarfile's own for long or non-ASCII names."""
    encoded = name.encode()
    if len(encoded) > 100 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\x00" % size
    checksum = _HEADER_SUM + sum(encoded) + sum(size_field)
    return b"".join(
        (
            encoded,
            bytes(100 - len(encoded)),
            b"0000444\x00" + b"0000000\x00" * 2,  # mode, uid, gid
            size_field,
            b"00000000000\x00",  # mtime
            b"%06o\x00 " % checksum,
            b"0",  # a regular file
            bytes(100),  # no link name
            b"ustar\x0000",
            bytes(_BLOCK - 265),
        )
    )


def write_shard(store: Store, key: str, samples: Iterable[RawSample]) -> ShardInfo:
    """Write one .tar shard atomically, streaming; each sample is {"__key__": str, "png": bytes,
    "cls": int, "json": dict}. Members are written in sorted order per sample, as webdataset's
    TarWriter does; webdataset's readers (and any tar) read them."""
    count = 0
    with store.open_atomic(key) as f:
        out = _HashingWriter(f)
        for sample in samples:
            extra = set(sample) - ALLOWED_MEMBERS - {"__key__"}
            if extra:
                raise ValueError(
                    f"sample {sample.get('__key__')!r} has members {sorted(extra)}; allowed: {sorted(ALLOWED_MEMBERS)}"
                )
            members = {"png": sample["png"]}
            if "cls" in sample:
                members["cls"] = str(int(sample["cls"])).encode()
            if "json" in sample:
                members["json"] = json.dumps(sample["json"], sort_keys=True).encode()
            for ext in sorted(members):
                data = members[ext]
                out.write(_tar_header(f"{sample['__key__']}.{ext}", len(data)))
                out.write(data)
                out.write(bytes(-len(data) % _BLOCK))
            count += 1
        out.write(bytes(2 * _BLOCK))  # the end-of-archive marker
    return ShardInfo(key=key, count=count, sha256=out.hash.hexdigest(), bytes=out.size)


class ShardReadError(ValueError):
    """A shard or one of its samples cannot be read; the message names the shard URL and sample."""


def iter_raw_samples(
    store: Store, keys: list[str], sha256: dict[str, str] | None = None
) -> Iterator[RawSample]:
    """Stream the samples of `keys` in order, members as raw bytes (no decoding, no pickle).

    Each shard is opened through this store (no process-wide opener registry) and split into
    samples by webdataset's own tar iterators. A shard named in `sha256` is hashed as it is read
    and, once its last sample was yielded, checked: a byte changed where no reader looks (PNG
    pixels whose CRC PIL does not check, tar padding) raises `ShardReadError` naming the shard
    instead of passing silently. Only a shard read to its end is checked.
    """
    for key in keys:
        url, last = store.url(key), None
        expected = (sha256 or {}).get(key)
        found = None
        try:
            with store.open_read(key) as stream:
                reader = _HashingReader(stream)
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": reader}])):
                    last = sample.get("__key__")
                    yield sample
                found = reader.drain() if expected else None
        except (tarfile.TarError, OSError, ValueError, EOFError) as err:
            where = f"after sample {last!r}" if last else "at its first sample"
            raise ShardReadError(
                f"cannot read shard {url} ({where}): {type(err).__name__}: {err}. The shard is "
                "damaged or was changed after it was written; rerun the stage that wrote it."
            ) from err
        if expected and found != expected:
            raise ShardReadError(
                f"shard {url} does not match its recorded sha256 ({found} read, {expected} "
                "recorded): it was damaged or changed after it was written; rerun the stage that "
                "wrote it"
            )


def decode_sample(sample: RawSample, channels: int) -> DecodedSample:
    """Raw webdataset sample -> image uint8 [C, H, W], label (None when absent) and its JSON meta."""
    where = f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')}"
    if "png" not in sample:
        raise ShardReadError(f"{where} has no png member")
    try:
        label = int(sample["cls"]) if "cls" in sample else None
        meta = json.loads(sample["json"]) if "json" in sample else {}
        image = decode_png(sample["png"], channels)
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError for broken PNGs
        raise ShardReadError(
            f"{where} cannot be decoded ({type(err).__name__}: {err}); rerun the stage that wrote it"
        ) from err
    return DecodedSample(sample["__key__"], image, label, meta)


def iter_images(store: Store, keys: list[str], channels: int) -> Iterator[DecodedSample]:
    for sample in iter_raw_samples(store, keys):
        yield decode_sample(sample, channels)


def read_images(
    store: Store, keys: list[str], channels: int, limit: int | None = None
) -> tuple[np.ndarray, list[int | None]]:
    """All images of `keys` (at most `limit`) as uint8 [N, C, H, W], with their labels."""
    images, labels = [], []
    for s in iter_images(store, keys, channels):
        images.append(s.image)
        labels.append(s.label)
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no images in shards {keys}")
    return np.stack(images), labels
