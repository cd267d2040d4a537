"""Preference pairs: raw samples for preference objectives (`train.objective=dpo`).

A pair is `{"task", "chosen", "rejected", "source", "index"}` where `chosen` and `rejected` are raw
samples of the batch contract (`unijax.data.pipeline`) that share their prompt:
- understanding (`mmu`): the same image(s) and question, two answers;
- generation (`t2i`): the same caption, two images.

Files (JSON Lines, `data.pref_jsonl`, images under `data.pref_image_root`), one pair per line, in
either family of formats:
- align-anything's Janus preference files: `{"question", "image", "better_response",
  "worse_response"}` (its `Janus_TI2T` template), `{"question", "image", "response_1", "response_2",
  "overall_response"}` (its `AA_TI2T` template) and `{"prompt", "better_image", "worse_image"}` (the
  raw records its text-to-image script tokenises);
- TRL's preference style: `{"prompt", "chosen", "rejected"}` with `images` (a list) or `image` for
  understanding, each of the three a string or a list of chat messages (`{"role", "content"}`,
  content a string or parts `{"type": "text", "text"}` / `{"type": "image"}`); for generation,
  `chosen` and `rejected` are image paths (`{"prompt", "chosen": "a.png", "rejected": "b.png"}`).

The shapes world makes pairs too (`ShapesPairs`): the scene's true answer against a wrong one that
the same question gets in another scene, and the rendered scene of a caption against another scene.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from unijax.contract import BATCH_KEYS
from unijax.data import shapes
from unijax.data.pipeline import Layout, batch_spec, encode_sample, pad_sample
from unijax.data.records import (
    DEFAULT_LIMITS,
    MAX_IMAGES_PER_RECORD,
    BadRecordError,
    ImageLimits,
    is_bad,
    load_image_file,
)
from unijax.data.sources import JsonLines

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
FORMATS = ("align_anything_ti2t", "align_anything_aa_ti2t", "align_anything_t2i", "trl")


def record_format(rec: Any) -> str:
    """Which preference format a parsed record is in (FORMATS), or "" when none."""
    if not isinstance(rec, dict):
        return ""
    if {"better_response", "worse_response"} <= rec.keys():
        return "align_anything_ti2t"
    if {"response_1", "response_2", "overall_response"} <= rec.keys():
        return "align_anything_aa_ti2t"
    if {"better_image", "worse_image"} <= rec.keys():
        return "align_anything_t2i"
    if {"prompt", "chosen", "rejected"} <= rec.keys():
        return "trl"
    return ""


def _text(value: Any, key: str, name: str, index: int) -> tuple[str, int]:
    """A TRL field as (text, number of image parts): a string, or chat messages whose content is a
    string or a list of text / image parts."""
    if isinstance(value, str):
        return value, 0
    if isinstance(value, list):
        texts, images = [], 0
        for m in value:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                texts.append(content)
                continue
            if not isinstance(content, list):
                raise BadRecordError(name, index, f"'{key}': a message without a string or list 'content'")
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image":
                    images += 1
                else:
                    raise BadRecordError(name, index, f"'{key}': a content part {part!r:.60} is neither text nor image")
        return "".join(texts), images
    raise BadRecordError(name, index, f"'{key}' must be a string or a list of messages, got {type(value).__name__}")


def _is_image_path(x: Any) -> bool:
    return isinstance(x, str) and x.lower().endswith(IMAGE_SUFFIXES)


def parse_pair(rec: Any, name: str, index: int, image_of) -> dict:
    """One preference record -> a raw pair (module docstring); `image_of(rel)` loads an image."""
    fmt = record_format(rec)
    if not fmt:
        keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise BadRecordError(name, index, f"not a preference record (keys {keys}); expected align-anything's "
                             f"question/image/better_response/worse_response or prompt/better_image/worse_image, "
                             f"or TRL's prompt/chosen/rejected")
    base = {"source": name, "index": index}
    if fmt == "align_anything_t2i" or (fmt == "trl" and _is_image_path(rec["chosen"])):
        prompt_key, (a, b) = "prompt", (("better_image", "worse_image") if fmt == "align_anything_t2i"
                                        else ("chosen", "rejected"))
        caption, _ = _text(rec.get(prompt_key), prompt_key, name, index)
        if not caption:
            raise BadRecordError(name, index, f"'{prompt_key}' is empty", "t2i")
        sides = {side: {"task": "t2i", "caption": caption, "image": image_of(rec[key]), **base}
                 for side, key in (("chosen", a), ("rejected", b))}
        return {"task": "t2i", **sides, **base}
    if fmt.startswith("align_anything"):
        if fmt == "align_anything_ti2t":
            chosen, rejected = rec["better_response"], rec["worse_response"]
        else:  # `overall_response` (1 or 2) names the better response
            better = rec["overall_response"]
            if better not in (1, 2, "1", "2"):
                raise BadRecordError(name, index, f"'overall_response' must be 1 or 2, got {better!r:.20}", "mmu")
            chosen, rejected = rec[f"response_{int(better)}"], rec[f"response_{3 - int(better)}"]
        question = rec.get("question")
        paths = [rec["image"]] if rec.get("image") is not None else []
    else:
        (question, marks), (chosen, _), (rejected, _) = (_text(rec[k], k, name, index)
                                                        for k in ("prompt", "chosen", "rejected"))
        paths = rec.get("images") if rec.get("images") is not None else (
            [rec["image"]] if rec.get("image") is not None else [])
        if not isinstance(paths, list):
            raise BadRecordError(name, index, f"'images' must be a list of paths, got {type(paths).__name__}", "mmu")
        if marks and marks != len(paths):
            raise BadRecordError(name, index, f"the prompt has {marks} image parts but the record names "
                                 f"{len(paths)} images", "mmu")
    for key, value in (("question", question), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or not value:
            raise BadRecordError(name, index, f"'{key}' must be a non-empty string", "mmu")
    if chosen == rejected:
        raise BadRecordError(name, index, "the chosen and rejected answers are the same", "mmu")
    if len(paths) > MAX_IMAGES_PER_RECORD:
        raise BadRecordError(name, index, f"{len(paths)} images, more than {MAX_IMAGES_PER_RECORD}", "mmu")
    images = [image_of(p) for p in paths]
    if len(images) > 1:  # each image at its mark, in order (`<image>` marks in the question)
        question = question if "<image>" in question else "<image>" * len(images) + question
    sides = {side: {"task": "mmu", "turns": [[question, answer]], "images": images, **base}
             for side, answer in (("chosen", chosen), ("rejected", rejected))}
    return {"task": "mmu", **sides, **base}


class PreferenceJsonl:
    """Random access to the preference pairs of one JSON Lines file (`parse_pair`)."""

    def __init__(self, path: str, image_root: str = "", limits: ImageLimits = DEFAULT_LIMITS, keep_bytes: bool = False):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.pref_jsonl: {path} does not exist")
        self.lines, self.image_root, self.limits = JsonLines(path, "pref"), image_root, limits
        self.path, self.keep_bytes = path, keep_bytes  # keep_bytes: images as their file's bytes (packing)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict:
        rec = self.lines.record(index)
        i = int(index) % len(self)
        return parse_pair(rec, self.path, i, lambda rel: load_image_file(
            self.image_root, rel, self.path, i, "pref", keep_bytes=self.keep_bytes, limits=self.limits))

    def __repr__(self) -> str:
        return f"PreferenceJsonl({self.path!r})"


class ShapesPairs(grain.transforms.Map):
    """grain transform: a supervised shapes sample (`datasets.ShapesSource`, one question) -> a
    preference pair. Understanding: the scene's true answer (chosen) against the answer the same kind
    of question gets in other scenes (rejected). Generation: the caption's scene (chosen) against
    another scene (rejected). Deterministic in `seed` and the sample's index."""

    def __init__(self, seed: int, image_size: int):
        self.seed, self.image_size = int(seed), int(image_size)

    def map(self, sample: dict) -> dict:
        rng = np.random.default_rng([self.seed, 7, int(sample["index"])])
        base = {"source": "shapes-pairs", "index": int(sample["index"])}
        if sample["task"] == "t2i":
            other = shapes.render(shapes.sample_scene(rng, self.image_size))
            return {"task": "t2i", "chosen": sample, "rejected": {**sample, "image": other}, **base}
        question, answer = sample["turns"][0]
        wrong = wrong_answer(answer, sample.get("kind"), rng, self.image_size)
        return {"task": "mmu", "chosen": {**sample, "turns": [[question, answer]]},
                "rejected": {**sample, "turns": [[question, wrong]]}, **base}


def wrong_answer(answer: str, kind: str | None, rng: np.random.Generator, image_size: int,
                 tries: int = 64) -> str:
    """An answer of the same kind of question that is not `answer` (drawn from other scenes)."""
    kinds: Sequence[str] | None = (kind,) if kind else None
    for _ in range(tries):
        scene = shapes.sample_scene(rng, image_size)
        if kinds and not shapes.admits(scene, kinds):
            continue
        other = shapes.sample_question(scene, rng, kinds).answer
        if other != answer:
            return other
    return "no" if shapes.answer_is_yes(answer) else "yes"


SIDES = ("chosen", "rejected")


def encode_pair(pair: dict, tokenizer, layout: Layout) -> dict[str, np.ndarray]:
    """A raw pair -> one padded batch row whose per-token arrays are `[2, max_len, ...]` (chosen,
    then rejected; `pipeline.encode_sample` each, with no CFG prompt drop). A bad record, or a side
    that does not fit `data.max_len` (`data.overflow`), makes both sides empty rows, counted once."""
    sides = [pair if is_bad(pair) else pair[s] for s in SIDES]
    rows = [pad_sample(encode_sample(x, tokenizer, layout), layout.max_len) for x in sides]
    if any(r["bad"].any() for r in rows):  # a skipped side skips the pair: no loss on either
        first = next(r for r in rows if r["bad"].any())
        rows = [first, first]
    out = {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}
    out["kind"] = np.int32(rows[0]["kind"])
    out["skip"] = rows[0]["skip"]
    out["origin"] = f"{pair.get('task', '')}:{pair.get('source', '')}:{pair.get('index', -1)}"
    return out


class EncodePair(grain.transforms.RandomMap):
    """grain transform: raw pair -> one padded row of pair arrays (`encode_pair`)."""

    def __init__(self, tokenizer, layout: Layout):
        self.tokenizer, self.layout = tokenizer, layout

    def random_map(self, pair, rng: np.random.Generator):
        return encode_pair(pair, self.tokenizer, self.layout)


def pair_batch_spec(layout: Layout, batch_size: int) -> dict:
    """`pipeline.batch_spec` with the pair axis after the rows: `[batch_size, 2, max_len, ...]`."""
    return {k: ((shape[0], 2, *shape[1:]), dtype) for k, (shape, dtype) in batch_spec(layout, batch_size).items()}
