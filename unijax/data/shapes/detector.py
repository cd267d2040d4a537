"""Detector for the shapes world (`unijax.data.shapes`): finds the objects of an image. numpy only.

`detect(image)` finds the objects of an RGB image (a clean render, a VQ reconstruction or a generated
image) in four steps:
  1. pixel colours: each pixel is projected onto the ray from BACKGROUND towards every palette colour;
     it is foreground when its nearest ray (by perpendicular distance) covers >= half the colour's
     intensity (`alpha >= 0.5`, so a blurred edge half-mixed with the background still counts, but
     noise on black does not) within a ~27 degree cone (`resid <= 0.5 * alpha * |colour|`);
  2. colour smoothing: each foreground pixel takes the most common colour of its 3x3 neighbourhood, so
     stray hues on edges do not split an object;
  3. connected components (8-connected) per colour, by union-find over horizontal runs; components
     smaller than 1 % of the image are noise;
  4. shape: from the fill of the upper and lower halves of the component's box (after trimming a
     stray end row / column): lopsided is a triangle (clean 1/4 vs 3/4), else full is a square (1)
     and the rest a circle (pi/4);
  5. objectness (a detector's confidence threshold): a component counts only when its box could hold
     one of the world's objects: sides within SIDE_TOLERANCE of `shapes.object_size_range`, aspect
     ratio <= MAX_ASPECT, filling >= MIN_FILL of the box, and with IoU >= MIN_SHAPE_IOU against the
     ideal drawing of its shape in that box. Colour noise (an untrained generator's output) is blobs

Imports `world` only.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from unijax.data.shapes.world import BACKGROUND, COLOURS, Obj, Scene, object_size_range, render

_COLOUR_NAMES = tuple(COLOURS)
_DIRS = np.array([COLOURS[c] for c in _COLOUR_NAMES], np.float32) - np.array(BACKGROUND, np.float32)  # [6, 3]
_NORM2 = (_DIRS**2).sum(1)  # [6]
MIN_ALPHA = 0.5        # foreground: at least half the palette colour's intensity over the background
MAX_TAN = 0.5          # foreground: within atan(0.5) ~ 27 degrees of the palette colour
MIN_AREA_FRAC = 0.01   # components smaller than this fraction of the image are noise
TRIANGLE_ASYMMETRY = 0.25  # |lower - upper half fill| above this: triangle (clean 0.5, circle / square 0)
SQUARE_FILL = 0.87         # mean fill above this: square (clean 1.0), else circle (clean 0.785); a blurred
                           # edge costs a square more fill than a circle, hence below the midpoint 0.89
SIDE_TOLERANCE = (0.7, 1.3)  # object-like: box sides within these factors of the world's object sizes,
MAX_ASPECT = 1.5             # at most this elongated,
MIN_FILL = 0.35              # filling this much of the box (clean: triangle 0.5, circle 0.785),
MIN_SHAPE_IOU = 0.7          # and overlapping the ideal drawing of its shape in its box this much


@dataclasses.dataclass(frozen=True)
class Detection:
    """A detected object: `shape` in SHAPES, `colour` in COLOURS, `box = (x0, y0, x1, y1)` (exclusive end)."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel colour labels int64 `[H, W]`: 0 background, `1 + i` the i-th colour of COLOURS (steps 1-2)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image has shape {image.shape}; expected [H, W, 3]")
    pixels = image.astype(np.float32) - np.array(BACKGROUND, np.float32)  # [H, W, 3]
    dots = pixels @ _DIRS.T  # [H, W, 6]
    alpha = dots / _NORM2
    clipped = np.clip(alpha, 0.0, 1.0)
    resid2 = (pixels**2).sum(-1, keepdims=True) - 2 * clipped * dots + clipped**2 * _NORM2  # |p - a d|^2
    nearest = resid2.argmin(-1)  # [H, W]
    a = np.take_along_axis(clipped, nearest[..., None], -1)[..., 0]
    r2 = np.maximum(np.take_along_axis(resid2, nearest[..., None], -1)[..., 0], 0.0)
    fg = (np.take_along_axis(alpha, nearest[..., None], -1)[..., 0] >= MIN_ALPHA) & (
        r2 <= (MAX_TAN * a) ** 2 * _NORM2[nearest])
    # 3x3 majority colour among foreground pixels (the pixel's own colour wins ties)
    onehot = (nearest[None] == np.arange(len(_DIRS))[:, None, None]) & fg[None]  # [6, H, W]
    padded = np.pad(onehot.astype(np.int32), ((0, 0), (1, 1), (1, 1)))
    H, W = fg.shape
    votes = sum(padded[:, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)) * 2 + onehot
    return np.where(fg, votes.argmax(0) + 1, 0)


def _runs(labels: np.ndarray):
    """Horizontal runs of equal non-zero labels: arrays y, x0, x1 (exclusive), label, row-major order."""
    H, W = labels.shape
    padded = np.zeros((H, W + 2), labels.dtype)
    padded[:, 1:-1] = labels
    ys, xs = np.nonzero(padded[:, 1:] != padded[:, :-1])  # run boundaries at x in [0, W]
    same_row = ys[1:] == ys[:-1]
    y, x0, x1 = ys[:-1][same_row], xs[:-1][same_row], xs[1:][same_row]
    lab = labels[y, x0]
    keep = lab != 0
    return y[keep], x0[keep], x1[keep], lab[keep]


def components(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """8-connected components of equal non-zero labels `[H, W]`: an int64 `[H, W]` image of component
    ids (0 background, 1..k) and the label of each component (index i-1 for id i)."""
    y, x0, x1, lab = _runs(labels)
    ids = np.zeros(labels.shape, np.int64)
    n = len(y)
    if n == 0:
        return ids, []
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(y, np.arange(labels.shape[0] + 1)).tolist()
    x0l, x1l, labl = x0.tolist(), x1.tolist(), lab.tolist()
    for row in range(1, labels.shape[0]):
        p0, p1, c0, c1 = row_start[row - 1], row_start[row], row_start[row], row_start[row + 1]
        if p0 == p1 or c0 == c1:
            continue
        prev_x0, prev_x1 = x0l[p0:p1], x1l[p0:p1]
        for j in range(c0, c1):  # previous-row runs touching run j (8-connected): px1 >= x0 and px0 <= x1
            for i in range(p0 + bisect.bisect_left(prev_x1, x0l[j]), p0 + bisect.bisect_right(prev_x0, x1l[j])):
                if labl[i] == labl[j]:
                    ri, rj = find(i), find(j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
    roots, comp = np.unique([find(i) for i in range(n)], return_inverse=True)
    length = x1 - x0
    run_of_pixel = np.repeat(np.arange(n), length)
    xs = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length) + x0[run_of_pixel]
    ids[y[run_of_pixel], xs] = comp[run_of_pixel] + 1
    return ids, lab[roots].tolist()


def _trim(counts: np.ndarray) -> tuple[int, int]:
    """[start, stop) of a mask's rows (or columns) without a stray end line: one holding < 1/4 of the
    pixels of the line next to it (a noise pixel on a blurred edge; a triangle's apex holds >= 1/3)."""
    start, stop = 0, len(counts)
    if stop - start > 2 and counts[start] * 4 < counts[start + 1]:
        start += 1
    if stop - start > 2 and counts[stop - 1] * 4 < counts[stop - 2]:
        stop -= 1
    return start, stop


def shape_features(mask: np.ndarray) -> tuple[float, float, tuple[int, int, int, int]]:
    """(fill of the upper half, fill of the lower half, box) of one object's bool mask `[h, w]` (its
    bounding-box crop), after trimming stray end rows / columns; box is relative to the crop."""
    r0, r1 = _trim(mask.sum(1))
    c0, c1 = _trim(mask.sum(0))
    rows = mask[r0:r1, c0:c1].sum(1)
    h, w = len(rows), c1 - c0
    top = rows[: h // 2].sum() + (rows[h // 2] / 2 if h % 2 else 0)
    half = w * h / 2
    return float(top / half), float((rows.sum() - top) / half), (c0, r0, c1, r1)


def classify_shape(fill_top: float, fill_bottom: float) -> str:
    """A SHAPES entry from the fills of the upper / lower half of an object's box: a triangle is
    lopsided (clean: 1/4 vs 3/4), a square fills its box (1), a circle pi/4 of it."""
    if abs(fill_bottom - fill_top) > TRIANGLE_ASYMMETRY:
        return "triangle"
    return "square" if (fill_top + fill_bottom) / 2 > SQUARE_FILL else "circle"


def object_like(w: int, h: int, fill: float, lo: int, hi: int) -> bool:
    """Whether a `w x h` component box filled `fill` could hold an object of side `lo..hi` pixels."""
    a, b = SIDE_TOLERANCE
    sides_ok = all(a * lo <= side <= b * hi for side in (w, h))
    return sides_ok and max(w, h) <= MAX_ASPECT * min(w, h) and fill >= MIN_FILL


def shape_iou(mask: np.ndarray, shape: str) -> float:
    """IoU of a bool mask `[h, w]` with `shape` drawn (as `shapes.render` draws it) in its full box."""
    h, w = mask.shape
    ideal = render(Scene((Obj(shape, "red", (0, 0, w, h)),), max(h, w))).any(-1)[:h, :w]
    return float((mask & ideal).sum() / max((mask | ideal).sum(), 1))


def detect(image: np.ndarray) -> list[Detection]:
    """Objects of a uint8 `[H, W, 3]` image, in row-major order of their first pixel."""
    ids, colour_of = components(classify_pixels(image))
    if not colour_of:
        return []
    min_area = MIN_AREA_FRAC * ids.size
    lo, hi = object_size_range(min(image.shape[:2]))
    area = np.bincount(ids.ravel(), minlength=len(colour_of) + 1)
    out = []
    for i, label in enumerate(colour_of, start=1):
        if area[i] < min_area:
            continue
        ys, xs = np.nonzero(ids == i)
        x0, y0 = int(xs.min()), int(ys.min())
        crop = ids[y0:int(ys.max()) + 1, x0:int(xs.max()) + 1] == i
        fill_top, fill_bottom, (c0, r0, c1, r1) = shape_features(crop)
        if not object_like(c1 - c0, r1 - r0, (fill_top + fill_bottom) / 2, lo, hi):
            continue
        shape = classify_shape(fill_top, fill_bottom)
        if shape_iou(crop[r0:r1, c0:c1], shape) < MIN_SHAPE_IOU:
            continue
        out.append(Detection(shape, _COLOUR_NAMES[label - 1], (x0 + c0, y0 + r0, x0 + c1, y0 + r1)))
    return out
