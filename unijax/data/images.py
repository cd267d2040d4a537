"""Image preprocessing: any uint8 `[H, W, 3]` image -> the model's square `[size, size, 3]` input.

One place for the rule each model family's processor applies, used by training
(`pipeline.encode_sample`), inference (`inference.engine`) and evaluation alike:

- `janus` (understanding images of Janus / Janus-Pro, as transformers' `JanusImageProcessor`
  configured like Janus-Pro's processor): the longest side is resized to `size` (bicubic, the
  aspect ratio kept, neither side below `min_size` = 14), then the image is padded to a square,
  centred, with the background colour of the processor's mean, (127, 127, 127) for mean 0.5.
  Nothing is cut off: a 4:3 photo keeps its whole width.
- `emu3` (Emu3's `Emu3ImageProcessor`, on a fixed square code grid): both sides become multiples
  of the VQ downsampling `factor` (its `smart_resize`, aspect ratio kept) with the longest side
  `size`; a square image is exactly `Emu3ImageProcessor(min_pixels=max_pixels=size**2)`. A
  non-square image is then padded at the bottom / right as the processor pads a batch (value 0
  after normalisation, mid-grey 128 here), since the fixed grid holds one shape.
- `crop` (generated-image targets of every family, as VQ tokenizers are trained): centre square
  crop, then bicubic resize. A generation target padded with grey bars would teach the model to
  draw them.

Normalisation (`x / 127.5 - 1`, mean = std = 0.5 as both processors are configured in the
released checkpoints) happens on device (`unijax.models.image_inputs.gather_images`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

RULES = ("janus", "emu3", "crop")
JANUS_BACKGROUND = (127, 127, 127)  # int(0.5 * 255) per channel, as JanusImageProcessor computes it
JANUS_MIN_SIZE = 14
EMU3_PAD_VALUE = 128  # 0 after normalisation to [-1, 1], rounded to uint8


@dataclasses.dataclass(frozen=True)
class ImageRule:
    """How an image becomes a `size x size` model input (see the module docstring)."""

    rule: str
    size: int
    factor: int = 1  # emu3: both sides multiples of this (the VQ downsampling)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown image rule {self.rule!r}; expected one of {RULES}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return preprocess(image, self)


def _check(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return image


def _bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), dtype=np.uint8)


def janus_size(height: int, width: int, size: int, min_size: int = JANUS_MIN_SIZE) -> tuple[int, int]:
    """The resized (height, width) before padding: longest side `size`, as `JanusImageProcessor.resize`."""
    delta = size / max(height, width)
    return max(round(height * delta), min_size), max(round(width * delta), min_size)


def resize_pad(image: np.ndarray, size: int, background=JANUS_BACKGROUND, min_size: int = JANUS_MIN_SIZE) -> np.ndarray:
    """The `janus` rule: longest side to `size`, then centred on a `background` square."""
    image = _check(image)
    h, w = janus_size(*image.shape[:2], size, min_size)
    resized = _bicubic(image, h, w)
    if h == w:
        return resized
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.asarray(background, np.uint8)
    if w > h:
        top = (side - h) // 2
        out[top:top + h] = resized
    else:
        left = (side - w) // 2
        out[:, left:left + w] = resized
    return out


def emu3_size(height: int, width: int, size: int, factor: int) -> tuple[int, int]:
    """(height, width): multiples of `factor`, aspect ratio kept, the longest side `size`."""
    if max(height, width) / min(height, width) > 200:  # Emu3's smart_resize refuses these too
        raise ValueError(f"image aspect ratio must be below 200, got {height}x{width}")
    delta = size / max(height, width)
    return (max(factor, min(size, round(height * delta / factor) * factor)),
            max(factor, min(size, round(width * delta / factor) * factor)))


def resize_emu3(image: np.ndarray, size: int, factor: int) -> np.ndarray:
    """The `emu3` rule: `emu3_size`, bicubic, then padded at the bottom / right to `size x size`."""
    image = _check(image)
    h, w = emu3_size(*image.shape[:2], size, factor)
    resized = _bicubic(image, h, w)
    if (h, w) == (size, size):
        return resized
    out = np.full((size, size, 3), EMU3_PAD_VALUE, np.uint8)
    out[:h, :w] = resized
    return out


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The `crop` rule: centre square crop, then bicubic resize to `size x size`."""
    image = _check(image)
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return _bicubic(np.ascontiguousarray(image[top:top + s, left:left + s]), size, size)


# rule name -> (image, rule) -> image; a model family names its understanding rule (`Family.image_layout`)
APPLY = {"janus": lambda image, r: resize_pad(image, r.size),
         "emu3": lambda image, r: resize_emu3(image, r.size, r.factor),
         "crop": lambda image, r: centre_crop(image, r.size)}


def preprocess(image: np.ndarray, rule: ImageRule) -> np.ndarray:
    """uint8 `[H, W, 3]` -> uint8 `[rule.size, rule.size, 3]` by `rule`."""
    out = APPLY[rule.rule](image, rule)
    if out.shape[:2] != (rule.size, rule.size):  # only when min_size exceeds size
        out = _bicubic(out, rule.size, rule.size)
    return out
