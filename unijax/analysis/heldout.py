"""The data an analysis runs on: the training config of the run that wrote a checkpoint, and its
held-out batches: for the shapes world the batches the `shapes_heldout` evaluator evaluates (scene
seed `S + HELD_OUT_SEED_OFFSET`, which the training stream of seed S never uses); for the user's
files (`data.source=files`) those of `files_heldout` (`data.eval_split` or `data.eval_*` files),
or, when the run held nothing out, batches of its own training files.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections

from unijax.data import pipeline, shapes
from unijax.data.tokenizer import check_compatible, load_tokenizer, resolve_spec
from unijax.training.config import defaults
from unijax.training.evaluators import HELD_OUT_SEED_OFFSET, files_heldout_batches, first_batches
from unijax.training.evaluators import heldout_batches as evaluator_batches


def run_config(ckpt) -> tuple[ml_collections.ConfigDict, pathlib.Path | None]:
    """(training config of the run that wrote `ckpt`, the config.json it came from or None):
    `unijax.training.config.defaults` with `seed`, `init_from`, `data.*`, `train.batch_size` and
    `train.eval_batches` from `<ckpt>/../config.json` when it exists."""
    c = defaults("tiny")
    path = pathlib.Path(ckpt).absolute().parent / "config.json"
    if not path.is_file():
        return c, None
    try:
        saved = json.loads(path.read_text())
        c.seed = int(saved.get("seed", c.seed))
        c.init_from = str(saved.get("init_from", "") or "")
        c.data.update({k: v for k, v in saved.get("data", {}).items() if k in c.data})
        c.train.update({k: v for k, v in saved.get("train", {}).items() if k in ("batch_size", "eval_batches")})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable unijax training config ({e}); move it away to use the "
                         f"unijax.training.config defaults") from e
    return c, path


def heldout_batches(cfg, config, num_batches: int, batch_size: int, seed: int, data_dir: str,
                    only: str | None = None):
    """(held-out batches of both tasks, images_per_row, data seed): the held-out evaluator's batches
    (module docstring) for a run with `seed`, `train.batch_size = batch_size`, `train.eval_batches =
    num_batches`. The run's task mix is kept, except that a task it left out (ratio 0) gets ratio 1:
    routing statistics need tokens of both tasks. `only="und"` / `"gen"`: batches of that task alone."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.objective = "lm"
    config.seed = seed
    files = config.data.source == "files"
    if not files:
        config.data.source = "shapes"
        config.data.dir = data_dir
    config.train.batch_size = batch_size
    config.train.eval_batches = num_batches
    for key in ("und_ratio", "gen_ratio"):
        if not config.data[key] > 0:
            config.data[key] = 1.0
    if only is not None:
        config.data["gen_ratio" if only == "und" else "und_ratio"] = 0.0
    tokenizer = load_tokenizer(resolve_spec(config.data.tokenizer, config.init_from), config.data.dir)
    check_compatible(tokenizer, cfg)
    layout = pipeline.Layout.for_data(cfg, config.data)
    if not files:
        batches = evaluator_batches(config, tokenizer, layout, tuple(shapes.KINDS))
    else:
        # its held-out part, else (a run that held nothing out) its own training files
        batches = files_heldout_batches(config, tokenizer, layout) or first_batches(config, tokenizer, layout)
    return pipeline.distinct_rows(batches), layout.images_per_row(False), seed + HELD_OUT_SEED_OFFSET

