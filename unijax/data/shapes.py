"""A deterministic procedural "shapes world": scenes, renders, prompts, questions and a corpus.

It trains and evaluates a tiny unified (understanding + generation) model on CPU with no downloads.
Pure numpy + PIL. The detector and GenEval-style scorer that read these images live in
`unijax.data.geneval` (also reachable as `shapes.detect`, `shapes.score`, `shapes.geneval`,
`shapes.match_scene`, `shapes.Detection`).

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

Text (all lowercase, no trailing spaces)
----------------------------------------
- `t2i_prompt`: a prompt that is true for the scene and mentions every object, with its GenEval-style
  `PromptSpec`: "a red circle", "a circle", "two red circles and a blue square", "a circle and a
  square", "a red circle to the left of a blue square", "a red circle, a blue square and a green
  triangle". Colour is omitted only in `single_object`, `two_object` and some `counting` prompts.
  `prompt_tags(scene)` lists the tags a scene admits; `t2i_prompt` draws one with TAG_WEIGHTS (or takes
  the one asked for); `prompt_set(seed, per_tag)` builds a tag-balanced GenEval-style evaluation set.
- `questions` / `sample_question`: understanding `QA`s of KINDS:
    exist_positive / exist_random / exist_popular / exist_adversarial
        "is there a red circle in the image?" -> "yes" / "no" (POPE; the three negative kinds pick an
        absent identity: any / among POPULAR / sharing the shape or colour of a present object)
    colour    "what colour is the square?" -> "red" (only for a shape present exactly once)
    shape     "what shape is the red object?" -> "circle" (only for a colour present exactly once)
    count     "how many circles are there?" -> "zero" / "one" / "two" / "three" (a present shape 3 times
              in 4, otherwise an absent one, hence "zero")
    position  "is the red circle to the left of the blue square?" -> "yes" / "no", or "where is the red
              circle relative to the blue square?" -> "left" / "right" / "above" / "below" (only between
              objects whose identity is unique in the scene; "where" only when exactly one relation holds;
              "no" questions ask the opposite of a true relation, never an unclear one)
    choice    "what colour is the circle?\\na. red\\nb. blue\\nc. green\\nd. yellow\\nanswer with the letter."
              -> "a" (lowercase letter, uniform over a-d), or the same over counts "how many circles are
              there?" with the options zero..three in random order
    caption   "describe the image." -> "a red circle, a blue square and a green triangle" (every object,
              left to right): dense grounding, the shapes world's image-captioning data
- `corpus()`: every string the world can produce, for training the tokenizer.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import itertools
import math
from collections import Counter
from typing import Sequence

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
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
RELATION_WORD = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
LETTERS: tuple[str, ...] = ("a", "b", "c", "d")
CHOICE_SUFFIX = "answer with the letter."
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
KINDS: tuple[str, ...] = ("exist_positive", "exist_random", "exist_popular", "exist_adversarial",
                          "colour", "shape", "count", "position", "choice", "caption")
CAPTION_QUESTION = "describe the image."
EXIST_NEGATIVE_KINDS = ("exist_random", "exist_popular", "exist_adversarial")

_SHAPE_WEIGHTS = np.array([0.40, 0.33, 0.27])
_COLOUR_WEIGHTS = np.array([0.22, 0.17, 0.20, 0.15, 0.14, 0.12])  # in COLOURS order
IDENTITIES: tuple[tuple[str, str], ...] = tuple(itertools.product(SHAPES, COLOURS))
IDENTITY_PRIOR = np.outer(_SHAPE_WEIGHTS, _COLOUR_WEIGHTS).ravel() / (_SHAPE_WEIGHTS.sum() * _COLOUR_WEIGHTS.sum())
_IDENTITY_CDF = np.cumsum(IDENTITY_PRIOR).tolist()
POPULAR: tuple[tuple[str, str], ...] = tuple(IDENTITIES[i] for i in np.argsort(-IDENTITY_PRIOR, kind="stable")[:6])
REPEAT_PROB = 0.25
# t2i_prompt's odds among the tags a scene admits; over random scenes: counting ~31 %, two_object ~4 %, others 15-18 %
TAG_WEIGHTS = {"single_object": 1.0, "colors": 1.0, "two_object": 3.0, "color_attr": 1.0, "counting": 0.4,
               "position": 6.0}
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


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """GenEval-style metadata of a prompt.

    include: `(shape, colour or None, count)` clauses: at least `count` detections of that shape (and
      colour, when given) must be present. exclude: clauses of which fewer than `count` may be present
      (a counting prompt "two circles" includes `("circle", None, 2)` and excludes `("circle", None, 3)`).
    position: `(relation, a, b)`: every detection matching include[a] is `relation` include[b].
    """

    tag: str
    include: tuple[tuple[str, str | None, int], ...]
    exclude: tuple[tuple[str, str | None, int], ...] = ()
    position: tuple[str, int, int] | None = None


@dataclasses.dataclass(frozen=True)
class QA:
    """An understanding question, its expected answer and its kind (one of KINDS)."""

    question: str
    answer: str
    kind: str


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


# -- prompts --------------------------------------------------------------------------------------

def phrase(shape: str, colour: str | None = None, count: int = 1) -> str:
    """"a red circle", "two circles", ... (count 1..3)."""
    head = "a" if count == 1 else NUMBER_WORDS[count]
    noun = shape if count == 1 else shape + "s"
    return " ".join([head] + ([colour] if colour else []) + [noun])


def join_phrases(phrases: Sequence[str]) -> str:
    """"x", "x and y", "x, y and z"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _groups(keys: Sequence) -> list[tuple]:
    """(key, count) in order of first appearance."""
    return list(Counter(keys).items())


def _unique_objects(scene: Scene) -> list[Obj]:
    counts = Counter((o.shape, o.colour) for o in scene.objects)
    return [o for o in scene.objects if counts[o.shape, o.colour] == 1]


def _related_pairs(scene: Scene) -> list[tuple[Obj, Obj, set[str]]]:
    """Ordered pairs of objects with unique identities and at least one clear relation."""
    unique = _unique_objects(scene)
    pairs = [(a, b, relations(a.box, b.box)) for a, b in itertools.permutations(unique, 2)]
    return [p for p in pairs if p[2]]


def _counting_variants(scene: Scene) -> list[list[tuple[str, str | None, int]]]:
    with_colour = [(s, c, n) for (s, c), n in _groups([(o.shape, o.colour) for o in scene.objects])]
    shape_only = [(s, None, n) for s, n in _groups([o.shape for o in scene.objects])]
    return [g for g in (with_colour, shape_only) if any(n >= 2 for _, _, n in g)]


def prompt_tags(scene: Scene) -> list[str]:
    """The TAGS a true, every-object prompt for `scene` can have (see the module docstring)."""
    objs = scene.objects
    identities = [(o.shape, o.colour) for o in objs]
    tags = []
    if len(objs) == 1:
        tags += ["single_object", "colors"]
    if len(objs) == 2 and objs[0].shape != objs[1].shape:
        tags.append("two_object")
    if len(objs) >= 2 and len(set(identities)) == len(objs):
        tags.append("color_attr")
    if _counting_variants(scene):
        tags.append("counting")
    if len(objs) == 2 and _related_pairs(scene):
        tags.append("position")
    return tags


def t2i_prompt(scene: Scene, rng: np.random.Generator, tag: str | None = None) -> tuple[str, PromptSpec]:
    """A prompt true for `scene` that mentions every object, and its spec. The tag is `tag`, or drawn
    from `prompt_tags(scene)` with TAG_WEIGHTS (which even out the tags over random scenes)."""
    objs = scene.objects
    if not objs:
        raise ValueError("scene has no objects; cannot describe it")
    tags = prompt_tags(scene)
    if tag is None:
        weights = np.array([TAG_WEIGHTS[t] for t in tags])
        tag = tags[int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right"))]
    elif tag not in tags:
        raise ValueError(f"tag={tag!r} does not apply to this scene (possible: {tags})")
    order = [objs[i] for i in rng.permutation(len(objs))]
    if tag == "single_object":
        o = objs[0]
        return phrase(o.shape), PromptSpec(tag, ((o.shape, None, 1),))
    if tag == "colors":
        o = objs[0]
        return phrase(o.shape, o.colour), PromptSpec(tag, ((o.shape, o.colour, 1),))
    if tag == "two_object":
        clauses = tuple((o.shape, None, 1) for o in order)
    elif tag == "color_attr":
        clauses = tuple((o.shape, o.colour, 1) for o in order)
    elif tag == "counting":
        variants = _counting_variants(scene)
        groups = variants[int(rng.integers(len(variants)))]
        clauses = tuple(groups[i] for i in rng.permutation(len(groups)))
        exclude = tuple((s, c, n + 1) for s, c, n in clauses if n >= 2)
        return join_phrases([phrase(*c) for c in clauses]), PromptSpec(tag, clauses, exclude)
    else:  # position
        pairs = _related_pairs(scene)
        a, b, rels = pairs[int(rng.integers(len(pairs)))]
        rel = sorted(rels)[int(rng.integers(len(rels)))]
        text = f"{phrase(a.shape, a.colour)} {RELATION_PHRASE[rel]} {phrase(b.shape, b.colour)}"
        return text, PromptSpec(tag, ((a.shape, a.colour, 1), (b.shape, b.colour, 1)), position=(rel, 0, 1))
    return join_phrases([phrase(*c) for c in clauses]), PromptSpec(tag, clauses)


def prompt_set(seed: int, per_tag: int, size: int = 32) -> list[tuple[str, PromptSpec, Scene]]:
    """A tag-balanced GenEval-style set: `per_tag` (prompt, spec, scene the prompt is true for) of each
    of TAGS, in TAGS order; deterministic in (seed, per_tag, size). Scenes come from `scene_at(seed, i)`
    and each is used for its admissible tag that is furthest from its quota."""
    if per_tag < 1:
        raise ValueError(f"per_tag={per_tag} must be >= 1")
    chosen: dict[str, list] = {t: [] for t in TAGS}
    for index in itertools.count():
        scene = scene_at(seed, index, size)
        open_tags = [t for t in prompt_tags(scene) if len(chosen[t]) < per_tag]
        if open_tags:
            tag = min(open_tags, key=lambda t: len(chosen[t]))
            text, spec = t2i_prompt(scene, np.random.default_rng([seed, index, 1]), tag)
            chosen[tag].append((text, spec, scene))
            if all(len(v) == per_tag for v in chosen.values()):
                return [item for t in TAGS for item in chosen[t]]


# -- questions ------------------------------------------------------------------------------------

def caption(scene: Scene) -> str:
    """Every object, left to right (then top to bottom): "a red circle, a blue square and a green triangle"."""
    objs = sorted(scene.objects, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))
    return join_phrases([phrase(o.shape, o.colour) for o in objs])


def _exist_question(shape: str, colour: str) -> str:
    return f"is there a {colour} {shape} in the image?"


def _choice(stem: str, options: Sequence[str]) -> str:
    return "\n".join([stem] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [CHOICE_SUFFIX])


def _absent(scene: Scene, kind: str) -> list[tuple[str, str]]:
    """Absent identities that are valid negatives of `kind` (one of EXIST_NEGATIVE_KINDS)."""
    present = {(o.shape, o.colour) for o in scene.objects}
    absent = [i for i in IDENTITIES if i not in present]
    if kind == "exist_popular":
        return [i for i in absent if i in POPULAR]
    if kind == "exist_adversarial":
        return [i for i in absent if any(i[0] == s or i[1] == c for s, c in present)]
    return absent


def _once(values: Sequence[str]) -> list[str]:
    counts = Counter(values)
    return [v for v in dict.fromkeys(values) if counts[v] == 1]


def _applicable(scene: Scene, kind: str) -> bool:
    if kind == "exist_positive" or kind in ("count", "choice", "caption"):
        return bool(scene.objects)
    if kind in EXIST_NEGATIVE_KINDS:
        return bool(_absent(scene, kind))
    if kind == "colour":
        return bool(_once([o.shape for o in scene.objects]))
    if kind == "shape":
        return bool(_once([o.colour for o in scene.objects]))
    if kind == "position":
        return bool(_related_pairs(scene))
    raise ValueError(f"kind={kind!r} is not one of {KINDS}")


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _count_subject(scene: Scene, rng: np.random.Generator) -> tuple[str, int]:
    present = list(dict.fromkeys(o.shape for o in scene.objects))
    absent = [s for s in SHAPES if s not in present]
    shape = _pick(rng, absent) if absent and rng.random() < 0.25 else _pick(rng, present)
    return shape, sum(o.shape == shape for o in scene.objects)


def make_question(scene: Scene, kind: str, rng: np.random.Generator) -> QA:
    """One question of `kind` about `scene`; raises ValueError when the scene does not admit it."""
    if not _applicable(scene, kind):
        raise ValueError(f"kind={kind!r} does not apply to this scene")
    if kind == "exist_positive":
        o = _pick(rng, scene.objects)
        return QA(_exist_question(o.shape, o.colour), "yes", kind)
    if kind in EXIST_NEGATIVE_KINDS:
        shape, colour = _pick(rng, _absent(scene, kind))
        return QA(_exist_question(shape, colour), "no", kind)
    if kind == "colour":
        shape = _pick(rng, _once([o.shape for o in scene.objects]))
        colour = next(o.colour for o in scene.objects if o.shape == shape)
        return QA(f"what colour is the {shape}?", colour, kind)
    if kind == "shape":
        colour = _pick(rng, _once([o.colour for o in scene.objects]))
        shape = next(o.shape for o in scene.objects if o.colour == colour)
        return QA(f"what shape is the {colour} object?", shape, kind)
    if kind == "count":
        shape, n = _count_subject(scene, rng)
        return QA(f"how many {shape}s are there?", NUMBER_WORDS[n], kind)
    if kind == "caption":
        return QA(CAPTION_QUESTION, caption(scene), kind)
    if kind == "position":
        a, b, rels = _pick(rng, _related_pairs(scene))
        this, other = f"the {a.colour} {a.shape}", f"the {b.colour} {b.shape}"
        if len(rels) == 1 and rng.random() < 0.5:
            return QA(f"where is {this} relative to {other}?", RELATION_WORD[next(iter(rels))], kind)
        rel = _pick(rng, sorted(rels))
        answer = "yes"
        if rng.random() < 0.5:
            rel, answer = OPPOSITE[rel], "no"
        return QA(f"is {this} {RELATION_PHRASE[rel]} {other}?", answer, kind)
    # choice: over the colour of a shape present once, or over a count
    shapes_once = _once([o.shape for o in scene.objects])
    letter = int(rng.integers(len(LETTERS)))
    if shapes_once and rng.random() < 0.5:
        shape = _pick(rng, shapes_once)
        colour = next(o.colour for o in scene.objects if o.shape == shape)
        others = [c for c in COLOURS if c != colour]
        options = [others[i] for i in rng.permutation(len(others))[: len(LETTERS) - 1]]
        options.insert(letter, colour)
        return QA(_choice(f"what colour is the {shape}?", options), LETTERS[letter], kind)
    shape, n = _count_subject(scene, rng)
    others = [w for i, w in enumerate(NUMBER_WORDS) if i != n]
    options = [others[i] for i in rng.permutation(len(others))]
    options.insert(letter, NUMBER_WORDS[n])
    return QA(_choice(f"how many {shape}s are there?", options), LETTERS[letter], kind)


def admits(scene: Scene, kinds: Sequence[str] | None = None) -> bool:
    """Whether the scene admits a question of one of `kinds` (default KINDS; always true then)."""
    return any(_applicable(scene, k) for k in _check_kinds(kinds))


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    kinds = KINDS if kinds is None else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds={kinds!r}: each must be one of {KINDS}")
    return kinds


def questions(scene: Scene, rng: np.random.Generator, kinds: Sequence[str] | None = None) -> list[QA]:
    """One question of every kind in `kinds` (default KINDS) that the scene admits, in KINDS order.
    (Not yes/no balanced: one positive against three negatives; use `sample_question` for that.)"""
    return [make_question(scene, k, rng) for k in _check_kinds(kinds) if _applicable(scene, k)]


def sample_question(scene: Scene, rng: np.random.Generator, kinds: Sequence[str] | None = None) -> QA:
    """A random question of one of `kinds` (default KINDS) that the scene admits.

    Families (existence, colour, shape, count, position, choice) are uniform; within existence the
    positive kind has probability 1/2 when negatives are allowed too, so yes/no answers are balanced
    (position yes/no questions are balanced by construction).
    """
    allowed = [k for k in _check_kinds(kinds) if _applicable(scene, k)]
    if not allowed:
        raise ValueError(f"kinds={kinds!r}: none applies to this scene")
    exist = [k for k in allowed if k.startswith("exist_")]
    families = (["exist"] if exist else []) + [k for k in allowed if k not in exist]
    family = _pick(rng, families)
    if family == "exist":
        negatives = [k for k in exist if k != "exist_positive"]
        if "exist_positive" in exist and (not negatives or rng.random() < 0.5):
            family = "exist_positive"
        else:
            family = _pick(rng, negatives)
    return make_question(scene, family, rng)


def answer_is_yes(text: str) -> bool:
    """POPE's rule: "no" when the first sentence contains the word no / not, otherwise "yes"."""
    first = text.strip().lower().split(".")[0]
    words = "".join(ch if ch.isalnum() else " " for ch in first).split()
    return not ("no" in words or "not" in words)


@functools.lru_cache(maxsize=8)
def blind_baseline(kinds: tuple[str, ...] | None = None, *, seed: int = 0, fit: int = 20000,
                   held_out: int = 4000) -> dict[str, float]:
    """Accuracy of the best image-blind answerer: what "chance" means for this question mix.

    The answerer sees only the question text: it answers each question with its most frequent
    answer over `fit` sampled training questions (the kind's most frequent answer when the exact
    text was never seen). It knows the world's priors (shape / colour frequencies, how often each
    count occurs, the letter layouts of multiple-choice options), so a model must beat it, not
    1/num_answers, to show it reads the image. Returns {"accuracy": ..., "accuracy_<kind>": ...}
    over `held_out` questions sampled like the training stream (`sample_question`)."""
    rng = np.random.default_rng([seed, 77])
    by_text: dict[str, Counter] = collections.defaultdict(Counter)
    by_kind: dict[str, Counter] = collections.defaultdict(Counter)
    def sample() -> QA:
        while True:  # scenes that admit none of `kinds` (e.g. colour with two circles) are not asked
            scene = sample_scene(rng)
            if admits(scene, kinds):
                return sample_question(scene, rng, kinds)

    for _ in range(fit):
        qa = sample()
        by_text[qa.question][qa.answer] += 1
        by_kind[qa.kind][qa.answer] += 1
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    for _ in range(held_out):
        qa = sample()
        table = by_text.get(qa.question) or by_kind[qa.kind]
        hits[qa.kind].append(bool(table) and table.most_common(1)[0][0] == qa.answer)
    out = {"accuracy": float(np.mean([h for v in hits.values() for h in v]))}
    out.update({f"accuracy_{k}": float(np.mean(v)) for k, v in hits.items()})
    return out


_GENEVAL_NAMES = ("Detection", "detect", "score", "geneval", "match_scene")


def __getattr__(name: str):
    """`shapes.detect` etc. re-export the detector / scorer of `unijax.data.geneval` (imported lazily:
    it imports this module)."""
    if name in _GENEVAL_NAMES:
        from unijax.data import geneval

        return getattr(geneval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- corpus ---------------------------------------------------------------------------------------

CORPUS_SEED = 20240601
CORPUS_SCENES = 3000


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    texts = list(SHAPES) + [s + "s" for s in SHAPES] + list(COLOURS) + list(NUMBER_WORDS) + ["yes", "no"]
    texts += [RELATION_WORD[r] for r in RELATIONS] + list(LETTERS) + [CHOICE_SUFFIX, "object", CAPTION_QUESTION]
    for shape, colour in IDENTITIES:  # every template with every filler
        texts += [phrase(shape, colour, n) for n in (1, 2, 3)] + [_exist_question(shape, colour)]
        texts += [f"what shape is the {colour} object?", f"what colour is the {shape}?"]
        texts += [f"is the {colour} {shape} {RELATION_PHRASE[r]} the {colour} {shape}?" for r in RELATIONS]
        texts.append(f"where is the {colour} {shape} relative to the {colour} {shape}?")
        texts.append(f"{phrase(shape, colour)}, {phrase(shape, colour)} and {phrase(shape, colour)}")
    for shape in SHAPES:
        texts += [phrase(shape, None, n) for n in (1, 2, 3)] + [f"how many {shape}s are there?"]
        texts.append(_choice(f"what colour is the {shape}?", list(COLOURS)[:4]))
        texts.append(_choice(f"how many {shape}s are there?", NUMBER_WORDS))
    texts += [f"{letter}. {option}" for letter in LETTERS for option in (*COLOURS, *NUMBER_WORDS)]
    rng = np.random.default_rng(CORPUS_SEED)
    for _ in range(CORPUS_SCENES):
        scene = sample_scene(rng)
        texts.append(t2i_prompt(scene, rng)[0])
        for qa in questions(scene, rng):
            texts += [qa.question, qa.answer]
    return tuple(texts)


def corpus() -> list[str]:
    """Every kind of string the world produces (word lists, every template with every filler, and the
    prompts, questions and answers of CORPUS_SCENES scenes sampled with CORPUS_SEED); deterministic."""
    return list(_corpus())
