"""Record-level pieces every reader of user data shares (`unijax.data.sources`, `unijax.data.arrayrecord`):
bad-record errors and markers, skipping bad records, index checks, and image decoding / encoding
(PNG, JPEG, grayscale, RGBA, palette and 16-bit images become RGB uint8 `[H, W, 3]`)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import re
import stat
import warnings
from typing import Any

import numpy as np
from PIL import Image

from unijax.io import atomic_file

# ----------------------------------------------------------------------------
# errors and bad-record markers
# ----------------------------------------------------------------------------


class BadRecordError(ValueError):
    """One record of a source cannot be turned into a raw sample.

    Attributes:
      source: the file the record came from.
      index: the record's index inside that file.
      reason: what is wrong (and, where useful, how to fix it).
      task: the record's task when it could be determined, else None.
    """

    def __init__(self, source: str, index: int, reason: str, task: str | None = None):
        self.source = str(source)
        self.index = int(index)
        self.reason = reason
        self.task = task
        super().__init__(f"{self.source}: record {self.index}: {reason}")

    def __reduce__(self):  # keep the attributes when sent between processes
        return (type(self), (self.source, self.index, self.reason, self.task))


def is_bad(sample: Any) -> bool:
    """True if ``sample`` is a bad-record marker produced by :func:`skip_bad`."""
    return isinstance(sample, dict) and sample.get("bad") is True


def normalise_index(index: Any, length: int, name: str) -> int:
    i = index.__index__()  # accepts int and numpy integers
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"{name}: index {int(index)} out of range for {length} records")
    return i


# ----------------------------------------------------------------------------
# image decoding / encoding
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image of a record (`data.max_image_pixels`, `data.max_image_bytes`,
    `data.allow_outside_image_root`): the pixels are checked from the file's header before anything
    is decoded, the bytes while reading; only regular files are read (not a FIFO or a device)."""

    max_pixels: int = 40_000_000
    max_bytes: int = 64 << 20
    allow_outside_root: bool = False


DEFAULT_LIMITS = ImageLimits()
MAX_RECORD_BYTES = 1 << 20    # one record's text (a JSON conversation or caption line; an ArrayRecord record less its images)
MAX_IMAGES_PER_RECORD = 64    # images one record may name (decoded before data.max_images applies)


def decode_image(data: bytes, max_pixels: int = DEFAULT_LIMITS.max_pixels) -> np.ndarray:
    """Decodes encoded image bytes (PNG, JPEG, ...) to an RGB uint8 [H, W, 3] array (`to_rgb`).

    Raises whatever PIL raises for undecodable or truncated data, and ValueError for an image of
    more than `max_pixels` (read from the header, before decoding); callers wrap that into a
    :class:`BadRecordError`.
    """
    with warnings.catch_warnings():  # PIL's own bomb warning: the pixel limit here is the check
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    with img:
        check_pixels(img, max_pixels)
        img.load()  # decode fully here so truncated files fail now
        return to_rgb(img)


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """Refuses an opened (not yet decoded) image of more than `max_pixels`."""
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"{w}x{h} = {w * h / 1e6:.1f} Mpx is more than the limit of {max_pixels / 1e6:.1f} Mpx "
                         f"(data.max_image_pixels)")


def to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image as RGB uint8 `[H, W, 3]`, the way transformers' image processors convert it
    (`transformers.image_transforms.convert_to_rgb`), on every path that reads an image file:

    - transparency (RGBA, LA, PA, P or L with a `transparency` entry) is composited onto white;
    - every other mode goes through PIL's `convert("RGB")`: 16-bit and 32-bit greyscale (I;16, I,
      F) are clipped to 0..255, not rescaled;
    - EXIF orientation is not applied (the processors do not apply it to an opened image).
    """
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"decoded image has shape {arr.shape}, expected [H, W, 3]")
    return np.ascontiguousarray(arr)


def encode_png(image: np.ndarray) -> bytes:
    """PNG-encodes an RGB uint8 [H, W, 3] array (lossless)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def read_image_bytes(path: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of the regular file `path`, at most `limits.max_bytes` (OSError / ValueError otherwise)."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:  # a FIFO must not block
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file (a FIFO, a device or a socket)")
        data = f.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise ValueError(f"larger than {limits.max_bytes:,} bytes (data.max_image_bytes)")
    return data


def load_image_file(image_root: str, rel: Any, name: str, index: int, task: str, keep_bytes: bool = False,
                    limits: ImageLimits = DEFAULT_LIMITS):
    if not isinstance(rel, str) or not rel:
        raise BadRecordError(name, index, f"'image' must be a non-empty relative path string, got {rel!r}", task)
    path = os.path.join(image_root, rel)
    if not limits.allow_outside_root:
        root = os.path.realpath(image_root or ".")
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise BadRecordError(name, index, f"image {rel!r} is outside the image root {image_root or '.'} (set "
                                 f"data.allow_outside_image_root=True to read it)", task)
    try:
        data = read_image_bytes(path, limits)
    except FileNotFoundError:
        raise BadRecordError(
            name, index, f"image {rel!r} not found under {image_root} (check image_root or the record's path)", task
        ) from None
    except (OSError, ValueError) as e:
        raise BadRecordError(name, index, f"cannot read image {path!r}: {e}", task) from None
    try:
        image = decode_image(data, limits.max_pixels)  # decoded even when the bytes are kept: a bad file is a bad record now
    except Exception as e:  # PIL raises many types for bad data
        reason = f"image {path!r} cannot be decoded ({type(e).__name__}: {e})"
        if "data.max_image_pixels" not in str(e) and not isinstance(e, Image.DecompressionBombError):
            reason += "; the file is corrupt or not an image"
        raise BadRecordError(name, index, reason, task) from None
    return data if keep_bytes else image


def decode_image_bytes(data: Any, name: str, index: int, task: str, keep_bytes: bool = False,
                       limits: ImageLimits = DEFAULT_LIMITS):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRecordError(name, index, f"'image' must be encoded image bytes, got {type(data).__name__}", task)
    if len(data) > limits.max_bytes:
        raise BadRecordError(name, index, f"image bytes larger than {limits.max_bytes:,} (data.max_image_bytes)", task)
    try:
        image = decode_image(bytes(data), limits.max_pixels)
        return bytes(data) if keep_bytes else image
    except Exception as e:
        reason = f"image bytes cannot be decoded ({type(e).__name__}: {e})"
        if "data.max_image_pixels" not in str(e):
            reason += "; rewrite the file with write_arrayrecord"
        raise BadRecordError(name, index, reason, task) from None


class SkippedRecords:
    """Skipped records, each once (by file and index), with how often it came up: `add` the
    `pipeline.skipped_in` entries of a batch; `summary()` counts them by reason; `write` lists them."""

    def __init__(self):
        self.records: dict[tuple[str, int, str], dict] = {}

    def add(self, entries, split: str = "train") -> None:
        for e in entries:
            key = (e["source"], int(e["index"]), split)
            if key in self.records:
                self.records[key]["visits"] += 1
            else:
                self.records[key] = {**e, "split": split, "visits": 1}

    def count(self, why: str | None = None, split: str = "train") -> int:
        return sum(1 for r in self.records.values() if r["split"] == split and (why is None or r["why"] == why))

    def summary(self) -> list[str]:
        """One line per split: the records skipped, then the count of each reason kind (numbers,
        quoted names and paths in a reason left out, so that one kind of problem is one entry)."""
        lines = []
        for split in sorted({r["split"] for r in self.records.values()}):
            kinds: dict[str, int] = {}
            for r in self.records.values():
                if r["split"] == split:
                    kind = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|\d[\d,.]*", "_", r["reason"])[:120]
                    kinds[kind] = kinds.get(kind, 0) + 1
            top = "; ".join(f"{n} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
            lines.append(f"skipped {self.count(split=split)} {split} records: {top}")
        return lines

    def write(self, path: pathlib.Path) -> None:
        """`path` (JSON lines, atomically): file, index, split, why (bad_record | overflow), reason, visits."""
        rows = sorted(self.records.values(), key=lambda r: (r["split"], r["source"], r["index"]))
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))



# ----------------------------------------------------------------------------
# skipping bad records
# ----------------------------------------------------------------------------


class SkipBad:
    """Wraps a source; when ``enabled``, bad records become bad-record markers.

    A marker is ``{"task": <record's task, else the source's task, else "bad">,
    "bad": True, "source": file, "index": record index, "reason": str}``. When
    not enabled, :class:`BadRecordError` propagates unchanged. Other errors
    (e.g. ``IndexError``) always propagate.
    """

    def __init__(self, source: Any, enabled: bool):
        self.source = source
        self.enabled = bool(enabled)

    @property
    def task(self) -> str | None:
        return getattr(self.source, "task", None)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"SkipBad({self.source!r}, enabled={self.enabled})"

    def __getitem__(self, index: int) -> dict:
        try:
            return self.source[index]
        except BadRecordError as e:
            if not self.enabled:
                raise
            return {
                "task": e.task or self.task or "bad",
                "bad": True,
                "source": e.source,
                "index": e.index,
                "reason": e.reason,
            }


def skip_bad(source: Any, enabled: bool) -> SkipBad:
    """Returns ``source`` wrapped so that, if ``enabled``, bad records yield markers (see :class:`SkipBad`)."""
    return SkipBad(source, enabled)
