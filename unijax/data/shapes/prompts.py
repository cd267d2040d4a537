"""Text-to-image prompts of the shapes world: GenEval-style `PromptSpec`s, tags, prompt sets, captions.

- `t2i_prompt`: a prompt that is true for the scene and mentions every object, with its GenEval-style
  `PromptSpec`: "a red circle", "a circle", "two red circles and a blue square", "a circle and a
  square", "a red circle to the left of a blue square", "a red circle, a blue square and a green
  triangle". Colour is omitted only in `single_object`, `two_object` and some `counting` prompts.
  `prompt_tags(scene)` lists the tags a scene admits; `t2i_prompt` draws one with TAG_WEIGHTS (or takes
  the one asked for); `prompt_set(seed, per_tag)` builds a tag-balanced GenEval-style evaluation set.
- `caption(scene)`: every object, left to right (the answer of the "caption" question kind).

Imports `world` only.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Sequence

import numpy as np

from unijax.data.shapes.world import Obj, Scene, relations, scene_at

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
RELATION_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# t2i_prompt's odds among the tags a scene admits; over random scenes: counting ~31 %, two_object ~4 %, others 15-18 %
TAG_WEIGHTS = {"single_object": 1.0, "colors": 1.0, "two_object": 3.0, "color_attr": 1.0, "counting": 0.4,
               "position": 6.0}


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


def caption(scene: Scene) -> str:
    """Every object, left to right (then top to bottom): "a red circle, a blue square and a green triangle"."""
    objs = sorted(scene.objects, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))
    return join_phrases([phrase(o.shape, o.colour) for o in objs])
