"""GenEval-style scoring of detections (`unijax.data.shapes.detector`) for the shapes world. numpy only.

`score(spec, detections)` is GenEval's rule, `partial_score` its share of checks that hold;
`geneval(specs, images)` aggregates `score` per tag;
`match_scene(scene, detections)` checks a detection list against the ground truth.

Imports `world`, `prompts` and `detector`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from unijax.data.shapes.detector import Detection, detect
from unijax.data.shapes.prompts import TAGS, PromptSpec
from unijax.data.shapes.world import Scene, relations

MATCH_IOU = 0.5


def _matching(detections: Sequence[Detection], shape: str, colour: str | None) -> list[Detection]:
    return [d for d in detections if d.shape == shape and (colour is None or d.colour == colour)]


def score(spec: PromptSpec, detections: Sequence[Detection]) -> bool:
    """GenEval's rule: every include clause has >= count matches, every exclude clause < count, and
    every pair (detection of include[a], detection of include[b]) stands in the position relation."""
    for shape, colour, count in spec.include:
        if len(_matching(detections, shape, colour)) < count:
            return False
    for shape, colour, count in spec.exclude:
        if len(_matching(detections, shape, colour)) >= count:
            return False
    if spec.position is not None:
        relation, a, b = spec.position
        targets = _matching(detections, *spec.include[b][:2])
        for da in _matching(detections, *spec.include[a][:2]):
            for db in targets:
                if da is not db and relation not in relations(da.box, db.box):
                    return False
    return True


def partial_score(spec: PromptSpec, detections: Sequence[Detection]) -> float:
    """The share of `score`'s checks that hold: each include clause, each exclude clause and (when
    the prompt has one) the position relation count one each; 1.0 exactly when `score` is True. A
    graded judge for preference pairs, where GenEval's all-or-nothing rule ties most samples."""
    checks = [len(_matching(detections, shape, colour)) >= count for shape, colour, count in spec.include]
    checks += [len(_matching(detections, shape, colour)) < count for shape, colour, count in spec.exclude]
    if spec.position is not None:
        relation, a, b = spec.position
        found_a, found_b = _matching(detections, *spec.include[a][:2]), _matching(detections, *spec.include[b][:2])
        checks.append(bool(found_a and found_b) and all(
            da is db or relation in relations(da.box, db.box) for da in found_a for db in found_b))
    return sum(checks) / len(checks) if checks else 1.0


def geneval(specs: Sequence[PromptSpec], images: Iterable[np.ndarray]) -> dict:
    """GenEval over images generated for `specs`: `{tag: accuracy}` for each tag present, "overall"
    (the mean over those tags, as GenEval reports it), "counts" `{tag: n}` and "correct" (per image)."""
    images = list(images)
    if len(images) != len(specs):
        raise ValueError(f"images: got {len(images)} for {len(specs)} specs")
    correct = [score(spec, detect(image)) for spec, image in zip(specs, images)]
    counts = {t: sum(s.tag == t for s in specs) for t in TAGS if any(s.tag == t for s in specs)}
    out: dict = {t: sum(c for s, c in zip(specs, correct) if s.tag == t) / n for t, n in counts.items()}
    out["overall"] = sum(out[t] for t in counts) / len(counts) if counts else float("nan")
    out["counts"] = counts
    out["correct"] = correct
    return out


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two `(x0, y0, x1, y1)` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_scene(scene: Scene, detections: Sequence[Detection], min_iou: float = MATCH_IOU) -> bool:
    """True when the detections are exactly the scene's objects: one each, same shape and colour,
    box IoU >= min_iou, and nothing extra."""
    if len(detections) != len(scene.objects):
        return False
    unused = list(detections)
    for o in scene.objects:  # objects are disjoint, so at most one detection can reach IoU > 1/2
        best = max(unused, key=lambda d: (d.shape == o.shape and d.colour == o.colour, iou(d.box, o.box)))
        if best.shape != o.shape or best.colour != o.colour or iou(best.box, o.box) < min_iou:
            return False
        unused.remove(best)
    return True
