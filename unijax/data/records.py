"""Record-level pieces every reader of user data shares (`unijax.data.sources`, `unijax.data.arrayrecord`):
bad-record errors and markers, skipping bad records, index checks, and image decoding / encoding
(PNG, JPEG, grayscale, RGBA, palette and 16-bit images become RGB uint8 `[H, W, 3]`)."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

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


def decode_image(data: bytes) -> np.ndarray:
    """Decodes encoded image bytes (PNG, JPEG, ...) to an RGB uint8 [H, W, 3] array.

    Raises whatever PIL raises for undecodable or truncated data; callers wrap
    that into a :class:`BadRecordError`.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode fully here so truncated files fail now
        return _to_rgb_array(img)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grayscale: PIL's convert("RGB") clips instead of
        # scaling, so scale to 8 bits by hand.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
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


def load_image_file(image_root: str, rel: Any, name: str, index: int, task: str, keep_bytes: bool = False):
    if not isinstance(rel, str) or not rel:
        raise BadRecordError(name, index, f"'image' must be a non-empty relative path string, got {rel!r}", task)
    path = os.path.join(image_root, rel)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadRecordError(
            name, index, f"image {rel!r} not found under {image_root} (check image_root or the record's path)", task
        ) from None
    except OSError as e:
        raise BadRecordError(name, index, f"cannot read image {path!r}: {e}", task) from None
    try:
        image = decode_image(data)  # decoded even when the bytes are kept: a corrupt file is a bad record now
    except Exception as e:  # PIL raises many types for bad data
        reason = f"image {path!r} cannot be decoded ({type(e).__name__}: {e}); the file is corrupt or not an image"
        raise BadRecordError(name, index, reason, task) from None
    return data if keep_bytes else image


def decode_image_bytes(data: Any, name: str, index: int, task: str, keep_bytes: bool = False):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRecordError(name, index, f"'image' must be encoded image bytes, got {type(data).__name__}", task)
    try:
        image = decode_image(bytes(data))
        return bytes(data) if keep_bytes else image
    except Exception as e:
        reason = f"image bytes cannot be decoded ({type(e).__name__}: {e}); rewrite the file with write_arrayrecord"
        raise BadRecordError(name, index, reason, task) from None


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
