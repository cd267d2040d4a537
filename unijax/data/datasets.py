"""Per-task datasets of raw samples from the `data.*` config: the shapes world or files on disk."""

from __future__ import annotations

import glob
from collections.abc import Sequence

import grain
import numpy as np

from unijax.contract import TASKS
from unijax.data import arrayrecord, records, shapes, sources
from unijax.data.pipeline import repeat_epochs

WORLD_SIZE = 2 ** 31 - 1  # the shapes world is a function of (seed, task, index): effectively infinite
HELD_OUT_SEED_OFFSET = 1_000_003  # held-out scenes of a run with seed S use seed S + this (never trained on)


# `data.scene_text`: an understanding sample's scene in words instead of pixels (the language stage,
# configs/stage0_lm.py); the caption names every object, left to right
SCENE_TEXT = "scene: {caption}.\n{question}"


class ShapesSource:
    """Random access to shapes-world samples: index -> one scene with a question (MMU) or a prompt (T2I).
    `scene_text`: understanding samples describe the scene in words (SCENE_TEXT) and carry no image."""

    def __init__(self, task: str, seed: int, image_size: int, kinds: Sequence[str] = (), turns: int = 1,
                 weights: dict[str, float] | None = None, scene_text: bool = False):
        if task not in TASKS:
            raise ValueError(f"task={task!r}: expected 'mmu' or 't2i'")
        if turns < 1:
            raise ValueError(f"data.turns_per_image={turns} must be >= 1")
        self.task, self.seed, self.image_size, self.turns = task, int(seed), int(image_size), int(turns)
        self.kinds = tuple(kinds) or None
        self.weights = dict(weights or {})  # question-family weights (shapes.sample_question); {}: uniform
        self.scene_text = bool(scene_text) and task == "mmu"  # the scene in words (SCENE_TEXT), no image

    def __len__(self) -> int:
        return WORLD_SIZE

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, 0 if self.task == "mmu" else 1, int(index)])
        scene = shapes.sample_scene(rng, self.image_size)
        while self.task == "mmu" and not shapes.admits(scene, self.kinds):  # e.g. colour questions, 3 circles
            scene = shapes.sample_scene(rng, self.image_size)                 # (deterministic: same rng)
        sample = {"task": self.task, "source": "shapes", "index": int(index)}
        if not self.scene_text:
            sample["image"] = shapes.render(scene)
        if self.task == "mmu":  # a chat about the image: `turns` distinct questions, the first one carries it
            qas = []
            for _ in range(8 * self.turns):
                qa = shapes.sample_question(scene, rng, self.kinds, self.weights)
                if qa.question not in {q.question for q in qas}:
                    qas.append(qa)
                if len(qas) == self.turns:
                    break
            turns = [[qa.question, qa.answer] for qa in qas]
            if self.scene_text:  # a text-only conversation: the first user turn describes the scene
                turns[0][0] = SCENE_TEXT.format(caption=shapes.caption(scene), question=turns[0][0])
            sample.update(turns=turns, kind=qas[0].kind)
        else:
            prompt, _ = shapes.t2i_prompt(scene, rng)
            sample["caption"] = prompt
        return sample

    def __repr__(self) -> str:
        return f"ShapesSource(task={self.task!r}, seed={self.seed}, image_size={self.image_size})"


def question_kinds(data_cfg) -> tuple[str, ...]:
    kinds = tuple(k for k in str(data_cfg.question_kinds).split(",") if k)
    unknown = [k for k in kinds if k not in shapes.KINDS]
    if unknown:
        raise ValueError(f"data.question_kinds: unknown kind {unknown[0]!r}; choose from {list(shapes.KINDS)}")
    return kinds


def question_weights(data_cfg) -> dict[str, float]:
    """`data.question_weights` ("exist=3,choice=2"): relative weights of the shapes question families."""
    return shapes.parse_weights(data_cfg.get("question_weights", ""))


def expand_files(spec: str) -> list[str]:
    """Comma-separated paths; a glob pattern (`packed/mmu-*.arrayrecord`) expands, sorted."""
    out = []
    for p in (p for p in str(spec).split(",") if p):
        if any(ch in p for ch in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise FileNotFoundError(f"{p}: no file matches this pattern")
            out += found
        else:
            out.append(p)
    return out


def task_datasets(data_cfg, image_size: int, seed: int, turns: int | None = None, part: str = "train",
                  mix: bool = True) -> tuple[list[grain.MapDataset], list[float]]:
    """-> ([understanding dataset, generation dataset], [und_ratio, gen_ratio]); a task with no data
    (or ratio 0) is left out. `turns` overrides `data.turns_per_image` (evaluation asks one question);
    `mix=False` ignores `data.question_weights` (held-out shapes questions are drawn uniformly over
    the question families, whatever the training mix).
    `part="heldout"` (files only): the held-out files (`data.eval_mmu_json` / `data.eval_t2i_jsonl`)
    or the held-out end of each training file (`data.eval_split`), which `part="train"` leaves out;
    ([], []) when there is none."""
    weights = {"mmu": float(data_cfg.und_ratio), "t2i": float(data_cfg.gen_ratio)}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"data.und_ratio={weights['mmu']} and data.gen_ratio={weights['t2i']}: "
                         f"ratios are >= 0 and at least one is > 0")
    out, ws = [], []
    for task in TASKS:
        if weights[task] == 0:
            continue
        if data_cfg.source == "shapes":
            ds = grain.MapDataset.source(ShapesSource(task, seed, image_size, question_kinds(data_cfg),
                                                      turns or int(data_cfg.turns_per_image),
                                                      question_weights(data_cfg) if mix else None,
                                                      scene_text=bool(data_cfg.get("scene_text", False))))
        elif data_cfg.source == "files":
            ds = _file_dataset(data_cfg, task, seed + (0 if task == "mmu" else 1), part)
            if ds is None:
                continue
        else:
            raise ValueError(f"data.source={data_cfg.source!r}: expected 'shapes' or 'files'")
        out.append(ds)
        ws.append(weights[task])
    if not out and part == "heldout":
        return [], []
    if not out:
        raise ValueError("data.source=files but no data is configured: set data.mmu_json (+ data.mmu_image_root), "
                         "data.t2i_jsonl (+ data.t2i_image_root), data.mmu_arrayrecord or data.t2i_arrayrecord")
    return out, ws


# per task: (files key, image-root key, weights key, ArrayRecord key, held-out files key)
_FILE_KEYS = {"mmu": ("mmu_json", "mmu_image_root", "mmu_weights", "mmu_arrayrecord", "eval_mmu_json"),
              "t2i": ("t2i_jsonl", "t2i_image_root", "t2i_weights", "t2i_arrayrecord", "eval_t2i_jsonl")}


def split_part(ds: grain.MapDataset, fraction: float, part: str) -> grain.MapDataset:
    """The training part of a file's records, or its held-out end (`fraction` of them, at least one)."""
    if fraction <= 0:
        return ds
    n = len(ds)
    k = min(n - 1, max(1, round(n * fraction)))
    return ds.slice(slice(0, n - k)) if part == "train" else ds.slice(slice(n - k, n))


def _weights(data_cfg, key: str, n: int) -> list[float] | None:
    if not data_cfg[key]:
        return None
    try:
        ws = [float(w) for w in str(data_cfg[key]).split(",")]
    except ValueError:
        raise ValueError(f"data.{key}={data_cfg[key]!r}: expected comma-separated numbers") from None
    if len(ws) != n or any(w < 0 for w in ws) or not any(w > 0 for w in ws):
        raise ValueError(f"data.{key}={data_cfg[key]!r}: one weight >= 0 per file ({n} files), at least one > 0")
    return ws


def image_limits(data_cfg) -> records.ImageLimits:
    """`data.max_image_pixels`, `data.max_image_bytes` and `data.allow_outside_image_root`."""
    return records.ImageLimits(int(data_cfg.max_image_pixels), int(data_cfg.max_image_bytes),
                               bool(data_cfg.allow_outside_image_root))


def _file_dataset(data_cfg, task: str, seed: int, part: str = "train") -> grain.MapDataset | None:
    """A task's files on disk as one endless shuffled dataset: each file a source (bad records
    skipped and counted when `data.skip_bad_records`), the files concatenated (sampled by size) or,
    with `data.<task>_weights`, mixed by those weights, each file reshuffled every epoch. `part`:
    `task_datasets`'s (held-out files are read whole and concatenated)."""
    files_key, root_key, weights_key, arrayrecord_key, eval_key = _FILE_KEYS[task]
    if data_cfg[files_key] and data_cfg[arrayrecord_key]:
        raise ValueError(f"set data.{files_key} or data.{arrayrecord_key}, not both")
    fraction = 0.0 if data_cfg[eval_key] else float(data_cfg.eval_split)  # held-out files: nothing split off
    key = eval_key if part == "heldout" and data_cfg[eval_key] else files_key
    if part == "heldout" and not data_cfg[eval_key] and fraction <= 0:
        return None
    if data_cfg[key]:
        names = expand_files(data_cfg[key])
        srcs = [sources.open_source(f, data_cfg[root_key], task, limits=image_limits(data_cfg)) for f in names]
    elif data_cfg[arrayrecord_key]:
        key, names = arrayrecord_key, expand_files(data_cfg[arrayrecord_key])
        srcs = [arrayrecord.ArrayRecordSource(names, image_limits(data_cfg))]
    else:
        return None
    for src, name in zip(srcs, names):
        if len(src) == 0:
            raise ValueError(f"data.{key}: {name} holds no records")
    dsets = [split_part(grain.MapDataset.source(records.skip_bad(src, bool(data_cfg.skip_bad_records))), fraction, part)
             for src in srcs]
    weights = None if key == eval_key else _weights(data_cfg, weights_key, len(dsets))
    if weights is None or len(dsets) == 1:
        return repeat_epochs(grain.MapDataset.concatenate(dsets) if len(dsets) > 1 else dsets[0], seed=seed)
    kept = [(repeat_epochs(d, seed=seed + 7919 * i), w) for i, (d, w) in enumerate(zip(dsets, weights)) if w > 0]
    return grain.MapDataset.mix([d for d, _ in kept], [w for _, w in kept])
