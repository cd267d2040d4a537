"""Per-task datasets of raw samples from the `data.*` config: the shapes world or files on disk."""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from unijax.contract import TASKS
from unijax.data import arrayrecord, shapes, sources
from unijax.data.pipeline import repeat_epochs

WORLD_SIZE = 2 ** 31 - 1  # the shapes world is a function of (seed, task, index): effectively infinite
HELD_OUT_SEED_OFFSET = 1_000_003  # held-out scenes of a run with seed S use seed S + this (never trained on)


class ShapesSource:
    """Random access to shapes-world samples: index -> one scene with a question (MMU) or a prompt (T2I)."""

    def __init__(self, task: str, seed: int, image_size: int, kinds: Sequence[str] = (), turns: int = 1):
        if task not in TASKS:
            raise ValueError(f"task={task!r}: expected 'mmu' or 't2i'")
        if turns < 1:
            raise ValueError(f"data.turns_per_image={turns} must be >= 1")
        self.task, self.seed, self.image_size, self.turns = task, int(seed), int(image_size), int(turns)
        self.kinds = tuple(kinds) or None

    def __len__(self) -> int:
        return WORLD_SIZE

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, 0 if self.task == "mmu" else 1, int(index)])
        scene = shapes.sample_scene(rng, self.image_size)
        while self.task == "mmu" and not shapes.admits(scene, self.kinds):  # e.g. colour questions, 3 circles
            scene = shapes.sample_scene(rng, self.image_size)                 # (deterministic: same rng)
        sample = {"task": self.task, "image": shapes.render(scene), "source": "shapes", "index": int(index)}
        if self.task == "mmu":  # a chat about the image: `turns` distinct questions, the first one carries it
            qas = []
            for _ in range(8 * self.turns):
                qa = shapes.sample_question(scene, rng, self.kinds)
                if qa.question not in {q.question for q in qas}:
                    qas.append(qa)
                if len(qas) == self.turns:
                    break
            sample.update(turns=[[qa.question, qa.answer] for qa in qas], kind=qas[0].kind)
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


def _files(spec: str) -> list[str]:
    return [p for p in str(spec).split(",") if p]


def task_datasets(data_cfg, image_size: int, seed: int, turns: int | None = None
                  ) -> tuple[list[grain.MapDataset], list[float]]:
    """-> ([understanding dataset, generation dataset], [und_ratio, gen_ratio]); a task with no data
    (or ratio 0) is left out. `turns` overrides `data.turns_per_image` (evaluation asks one question)."""
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
                                                         turns or int(data_cfg.turns_per_image)))
        elif data_cfg.source == "files":
            src = _file_source(data_cfg, task)
            if src is None:
                continue
            ds = repeat_epochs(grain.MapDataset.source(sources.skip_bad(src, bool(data_cfg.skip_bad_records))),
                               seed=seed + (0 if task == "mmu" else 1))
        else:
            raise ValueError(f"data.source={data_cfg.source!r}: expected 'shapes' or 'files'")
        out.append(ds)
        ws.append(weights[task])
    if not out:
        raise ValueError("data.source=files but no data is configured: set data.mmu_json (+ data.mmu_image_root), "
                         "data.t2i_jsonl (+ data.t2i_image_root), data.mmu_arrayrecord or data.t2i_arrayrecord")
    return out, ws


# per task: (JSON config key, its image-root key, the source reading it, the ArrayRecord key)
_FILE_KEYS = {"mmu": ("mmu_json", "mmu_image_root", sources.LlavaSource, "mmu_arrayrecord"),
              "t2i": ("t2i_jsonl", "t2i_image_root", sources.CaptionSource, "t2i_arrayrecord")}


def _file_source(data_cfg, task: str):
    json_key, root_key, source_cls, arrayrecord_key = _FILE_KEYS[task]
    if data_cfg[json_key] and data_cfg[arrayrecord_key]:
        raise ValueError(f"set data.{json_key} or data.{arrayrecord_key}, not both")
    if data_cfg[json_key]:
        return source_cls(data_cfg[json_key], data_cfg[root_key])
    if data_cfg[arrayrecord_key]:
        return arrayrecord.ArrayRecordSource(_files(data_cfg[arrayrecord_key]))
    return None
