"""Understanding questions of the shapes world (`QA`s of KINDS) and the image-blind baseline.

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
- `answer_is_yes`: POPE's yes / no rule; `blind_baseline`: the best image-blind answerer's accuracy.

Imports `world` and `prompts`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence

import numpy as np

from unijax.data.shapes.prompts import NUMBER_WORDS, RELATION_PHRASE, _related_pairs, caption
from unijax.data.shapes.world import COLOURS, IDENTITIES, POPULAR, SHAPES, Scene, sample_scene

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_WORD = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
LETTERS: tuple[str, ...] = ("a", "b", "c", "d")
CHOICE_SUFFIX = "answer with the letter."
KINDS: tuple[str, ...] = ("exist_positive", "exist_random", "exist_popular", "exist_adversarial",
                          "colour", "shape", "count", "position", "choice", "caption")
CAPTION_QUESTION = "describe the image."
EXIST_NEGATIVE_KINDS = ("exist_random", "exist_popular", "exist_adversarial")


@dataclasses.dataclass(frozen=True)
class QA:
    """An understanding question, its expected answer and its kind (one of KINDS)."""

    question: str
    answer: str
    kind: str


# -- questions ------------------------------------------------------------------------------------

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


FAMILIES: tuple[str, ...] = ("exist",) + KINDS[len(EXIST_NEGATIVE_KINDS) + 1:]  # sample_question's draw


def parse_weights(spec: str, key: str = "data.question_weights") -> dict[str, float]:
    """`"exist=3,choice=2"` -> {"exist": 3.0, "choice": 2.0}: relative weights of question families
    (FAMILIES; an unnamed family weighs 1) and of the negative existence kinds within existence
    (EXIST_NEGATIVE_KINDS, e.g. `exist_adversarial=2`: the share of that kind among the "no"
    questions; the positives stay half of existence). Raises ValueError naming `key` on a bad entry."""
    out: dict[str, float] = {}
    for item in (i.strip() for i in str(spec).split(",") if i.strip()):
        name, sep, value = item.partition("=")
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if name not in FAMILIES + EXIST_NEGATIVE_KINDS or not weight >= 0:
            raise ValueError(f"{key}: {item!r} must be name=weight with a weight >= 0 and a name among "
                             f"{FAMILIES + EXIST_NEGATIVE_KINDS}")
        out[name] = weight
    return out


def _weighted_pick(rng: np.random.Generator, names: Sequence[str], weights: dict[str, float]) -> str:
    """One of `names` in proportion to `weights` (a missing name weighs 1; all 0: uniform)."""
    w = np.array([weights.get(n, 1.0) for n in names], dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def sample_question(scene: Scene, rng: np.random.Generator, kinds: Sequence[str] | None = None,
                    weights: dict[str, float] | None = None) -> QA:
    """A random question of one of `kinds` (default KINDS) that the scene admits.

    Families (existence, colour, shape, count, position, choice, caption: FAMILIES) are uniform
    over those the scene admits, or drawn in proportion to `weights` (family -> weight, missing
    families weigh 1; see `parse_weights`); within existence the positive kind has probability
    1/2 when negatives are allowed too, so yes/no answers are balanced, and the negative kinds are
    uniform or drawn in proportion to their `weights` (position yes/no questions
    are balanced by construction).
    """
    allowed = [k for k in _check_kinds(kinds) if _applicable(scene, k)]
    if not allowed:
        raise ValueError(f"kinds={kinds!r}: none applies to this scene")
    exist = [k for k in allowed if k.startswith("exist_")]
    families = (["exist"] if exist else []) + [k for k in allowed if k not in exist]
    if weights:
        family = _weighted_pick(rng, families, weights)
    else:
        family = _pick(rng, families)
    if family == "exist":
        negatives = [k for k in exist if k != "exist_positive"]
        if "exist_positive" in exist and (not negatives or rng.random() < 0.5):
            family = "exist_positive"
        elif weights and any(weights.get(k, 1.0) != 1.0 for k in negatives):  # else the unweighted stream
            family = _weighted_pick(rng, negatives, weights)
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
