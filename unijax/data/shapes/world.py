"""The shapes world itself: palette, identity prior, objects and scenes, geometry, sampling, rendering.

Pure numpy + PIL; the lowest layer of `unijax.data.shapes` (imports nothing from the package).

World
-----
A scene is a `size x size` RGB image (`size >= 16`; 32, 64, 128 and 384 are tested) with a black
BACKGROUND and 1-3 flat-coloured objects. An object is one of SHAPES (circle, square, triangle; the
triangle is isosceles with its apex at the top) in one of six COLOURS, drawn inside a square box whose
side is 28-41 % of the image side (9-13 px at 32 px). Boxes never overlap: any two are separated by a
gap of at least `max(2, 0.08 * size)` pixels (3 px at 32 px) along x or y, and keep a 1 px+ border.

Identities (shape, colour) follow a fixed, mildly non-uniform prior (`IDENTITY_PRIOR`: circles and red
are the most common) so that POPE's "popular" negatives mean something (`POPULAR`: the six most likely
identities). Every object after the first repeats the identity of an earlier one with probability
0.25, so counting scenes ("two red circles") occur. A scene is a pure function of its numpy Generator;
`scene_at(seed, index)` gives random access. `render(scene)` draws it with PIL, without anti-aliasing.

Geometry: boxes are `(x0, y0, x1, y1)` pixels, x1 / y1 exclusive; y grows downwards, so "above" means
a smaller y. Spatial relations follow GenEval (`relations`): compare box centres after shrinking the
offset by 0.1 x (size a + size b) per axis; a relation holds when its axis carries more than half of
the (normalised) shrunk offset, so a diagonal pair can be both "left of" and "above".
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated, well separated in hue (>= 30 degrees apart as RGB directions), all far from black.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 60, 235),
    "yellow": (235, 215, 30),
    "purple": (190, 40, 215),
    "cyan": (30, 210, 210),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

_SHAPE_WEIGHTS = np.array([0.40, 0.33, 0.27])
_COLOUR_WEIGHTS = np.array([0.22, 0.17, 0.20, 0.15, 0.14, 0.12])  # in COLOURS order
IDENTITIES: tuple[tuple[str, str], ...] = tuple(itertools.product(SHAPES, COLOURS))
IDENTITY_PRIOR = np.outer(_SHAPE_WEIGHTS, _COLOUR_WEIGHTS).ravel() / (_SHAPE_WEIGHTS.sum() * _COLOUR_WEIGHTS.sum())
_IDENTITY_CDF = np.cumsum(IDENTITY_PRIOR).tolist()
POPULAR: tuple[tuple[str, str], ...] = tuple(IDENTITIES[i] for i in np.argsort(-IDENTITY_PRIOR, kind="stable")[:6])
REPEAT_PROB = 0.25
POSITION_THRESHOLD = 0.1  # GenEval's margin, in units of (size a + size b)


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: `shape` in SHAPES, `colour` in COLOURS, `box = (x0, y0, x1, y1)` pixels (exclusive end)."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape={self.shape!r} is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour={self.colour!r} is not one of {tuple(COLOURS)}")
        x0, y0, x1, y1 = self.box
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"box={self.box} must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0")


@dataclasses.dataclass(frozen=True)
class Scene:
    """`objects` drawn (in order) on a black `size x size` image."""

    objects: tuple[Obj, ...]
    size: int

    def __post_init__(self):
        for o in self.objects:
            if min(o.box) < 0 or max(o.box[2], o.box[3]) > self.size:
                raise ValueError(f"objects: box {o.box} is outside the {self.size}x{self.size} image")


# -- geometry -------------------------------------------------------------------------------------

def object_size_range(size: int) -> tuple[int, int]:
    """Smallest and largest box side (pixels, inclusive) of objects in a `size` image."""
    return round(0.28 * size), round(0.41 * size)


def object_gap(size: int) -> int:
    """Minimum empty pixels between two boxes of a `size` image."""
    return max(2, round(0.08 * size))


def relations(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """GenEval's relative position of box a to box b: a subset of RELATIONS (empty when too close)."""
    offset = [(box_a[i] + box_a[i + 2] - box_b[i] - box_b[i + 2]) / 2 for i in (0, 1)]
    dims = [box_a[i + 2] - box_a[i] + box_b[i + 2] - box_b[i] for i in (0, 1)]
    revised = [math.copysign(max(abs(o) - POSITION_THRESHOLD * d, 0.0), o) for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


# -- scenes ---------------------------------------------------------------------------------------

def _sample_identity(rng: np.random.Generator) -> tuple[str, str]:
    return IDENTITIES[min(bisect.bisect(_IDENTITY_CDF, rng.random()), len(IDENTITIES) - 1)]


def _sample_boxes(rng: np.random.Generator, n: int, size: int) -> list[tuple[int, int, int, int]] | None:
    """n boxes placed one by one, each the first valid of 100 random candidates; None when one fails."""
    lo, hi = object_size_range(size)
    gap, border = object_gap(size), max(1, object_gap(size) // 2)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        for u_side, u_x, u_y in rng.random((100, 3)).tolist():
            side = lo + int(u_side * (hi - lo + 1))
            room = size - 2 * border - side + 1
            x0, y0 = border + int(u_x * room), border + int(u_y * room)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
                   for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def sample_scene(rng: np.random.Generator, size: int = 32, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """A random scene of `min_objects..max_objects` non-overlapping objects; a function of `rng` alone."""
    if size < 16:
        raise ValueError(f"size={size} is too small; the shapes world needs size >= 16")
    if not 1 <= min_objects <= max_objects <= 3:
        raise ValueError(f"min_objects={min_objects}, max_objects={max_objects}: need 1 <= min <= max <= 3")
    n = int(rng.integers(min_objects, max_objects + 1))
    identities = []
    for i in range(n):
        if i and rng.random() < REPEAT_PROB:
            identities.append(identities[int(rng.integers(i))])
        else:
            identities.append(_sample_identity(rng))
    for _restart in range(50):
        boxes = _sample_boxes(rng, n, size)
        if boxes is not None:
            return Scene(tuple(Obj(s, c, b) for (s, c), b in zip(identities, boxes)), size)
    raise RuntimeError(f"could not place {n} objects in a {size}px image")  # never seen for n <= 3


def scene_at(seed: int, index: int, size: int = 32) -> Scene:
    """Scene `index` of the stream `seed` (random access): `sample_scene(default_rng([seed, index]), size)`."""
    return sample_scene(np.random.default_rng([seed, index]), size)


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 `[size, size, 3]` RGB pixels; no anti-aliasing, bit-exact across calls."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return np.array(image, dtype=np.uint8)
