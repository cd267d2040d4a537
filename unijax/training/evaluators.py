"""Evaluators: looked up by name from `eval.evaluators`, run by the training loop on their cadence.

Each evaluator owns its data and its metrics (big_vision's `evaluators/`): the loop calls
`build(context)` once, then, at every step where `evaluator.due(step)`, `evaluator(params, frozen)`
-> `{metric: float}`, logged under `evaluator.prefix`. An evaluator that does not apply to the run
(the shapes held-out set when the data are the user's files, suites when none are named) declines
at build time by returning None, so the loop holds no branch on the data source.

Registered here:
- `shapes_heldout`: held-out shapes scenes (`eval/`): understanding accuracy by question kind
  against the image-blind baseline, answer-mode shares, image-code loss, TA-MoE router accuracy
  and expert loads; for the VQ objective, reconstruction error and detector matches.
- `files_heldout`: the user's held-out data (`heldout/`): understanding accuracy, text and
  image-code losses, TA-MoE router accuracy and expert loads (`data.eval_split` or `data.eval_*`).
- `suites`: the benchmark suites of `eval_suites.*` (`suite/`), as `python -m unijax.evaluate`
  runs them, on smaller held-out sets.

A new evaluator is a class with `create(context) -> instance | None` (and optionally
`validate(config)`) under `@register("name")`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from unijax import contract, sharding
from unijax.data import datasets, pipeline, shapes
from unijax.distributed import to_host
from unijax.inference import suites
from unijax.inference.engine import Engine
from unijax.models import lora
from unijax.training import vq_loss
from unijax.training.steps import merged_model

EVALUATORS: dict[str, type] = {}


def register(name: str):
    """Class decorator: makes an evaluator available as `eval.evaluators = (..., name)`."""
    def add(cls):
        EVALUATORS[name] = cls
        cls.name = name
        return cls
    return add


@dataclasses.dataclass
class Context:
    """What the loop hands every evaluator."""

    config: Any
    graphdef: Any
    tokenizer: Any
    layout: pipeline.Layout
    mesh: Any
    eval_fn: Callable | None  # the objective's per-row eval function (`Objective.functions`)
    lora_scale: float = 1.0
    model_cfg: Any = None     # the model's config (JanusConfig / Emu3Config)
    heldout: str = "lm"       # the objective's built-in held-out evaluation: lm | vq | "" (`Objective.heldout`)


class Evaluator:
    name = ""
    label = "eval"     # the console line's first word
    prefix = "eval/"   # of its metrics in metrics.jsonl / TensorBoard
    every = 0          # steps between runs (and the last step); 0 = never

    @classmethod
    def validate(cls, config) -> None:
        """Config checks that need no compile (run by `unijax.training.config.validate`)."""

    @classmethod
    def create(cls, ctx: Context) -> Evaluator | None:
        raise NotImplementedError

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last_step)

    def __call__(self, params, frozen) -> dict[str, float]:
        raise NotImplementedError

    def summary(self, scores: dict[str, float]) -> str:
        """The console line of one evaluation."""
        return " ".join(f"{k}={v:.4f}" for k, v in scores.items() if "/" not in k)


def validate(config) -> None:
    names = tuple(config.eval.evaluators)
    bad = [n for n in names if n not in EVALUATORS]
    if bad:
        raise ValueError(f"eval.evaluators={names}: {bad} not among {tuple(EVALUATORS)}")
    for n in names:
        EVALUATORS[n].validate(config)


def build(ctx: Context) -> list[Evaluator]:
    """The configured evaluators that apply to this run."""
    made = (EVALUATORS[n].create(ctx) for n in ctx.config.eval.evaluators)
    return [e for e in made if e is not None]


# -- held-out shapes scenes -------------------------------------------------------------------------

HELD_OUT_SEED_OFFSET = datasets.HELD_OUT_SEED_OFFSET


def first_batches(config, tokenizer, layout: pipeline.Layout, *, part: str = "train", turns: int | None = None,
                  kinds=(), mix: bool = True) -> list[dict]:
    """The first `train.eval_batches` unpacked host batches of the configured data (`part`, `turns`:
    `datasets.task_datasets`'s), drawn with seed `config.seed + HELD_OUT_SEED_OFFSET` (a seed the
    training stream never uses); [] when that part has no data."""
    seed = config.seed + HELD_OUT_SEED_OFFSET
    dsets, weights = datasets.task_datasets(config.data, layout.image_size, seed, turns=turns, part=part, mix=mix)
    if not dsets:
        return []
    it = iter(pipeline.batches(dsets, weights, tokenizer=tokenizer, layout=layout, batch_size=config.train.batch_size,
                               seed=seed, packing=False, kinds=kinds))
    return [next(it) for _ in range(config.train.eval_batches)]


def heldout_batches(config, tokenizer, layout: pipeline.Layout, kinds) -> list[dict]:
    """`train.eval_batches` host batches of held-out shapes scenes (scene seed `config.seed +
    HELD_OUT_SEED_OFFSET`, which the training stream never uses), one question per image, the question
    families drawn uniformly (`data.question_weights` shapes only the training mix)."""
    return first_batches(config, tokenizer, layout, turns=1, kinds=kinds, mix=False)


def device_rows(config, batches: list[dict]) -> list[dict]:
    """Each process feeds its slice of every held-out batch's rows, as in training (`sharding.put_batch`)."""
    n_rows, pi, pc = config.train.batch_size, jax.process_index(), jax.process_count()
    rows = slice(pi * n_rows // pc, (pi + 1) * n_rows // pc)
    return [{k: b[k][rows] for k in contract.BATCH_KEYS} for b in batches]


def run_lm_eval(ev, params, frozen) -> dict[str, np.ndarray]:
    """`ev._fn` (the jitted per-row `lm_eval`) over `ev.device_batches`: per-row results of every
    held-out batch, gathered to the host, with each row's question kind."""
    rows = []
    for b, host in zip(ev.device_batches, ev.batches):
        out = to_host(ev._fn(params, frozen, sharding.put_batch(b, ev.mesh)))
        rows.append({**out, "kind": host["kind"]})
    return {k: np.concatenate([x[k] for x in rows]) for k in rows[0]}


def lm_scores(r: dict[str, np.ndarray], kinds=()) -> dict[str, float]:
    """Held-out scores from per-row `lm_eval` results: understanding exact-match accuracy (overall and
    per question kind, with the answer-mode share), text and image-code losses, and for TA-MoE the
    task-router accuracy per layer and expert load shares per group."""
    answered = r["answered"].astype(bool)
    scores = {}  # a score of a task the held-out rows do not hold is left out, not 0 or nan
    if answered.any():
        scores["accuracy"] = float(r["correct"][answered].mean())
    for key, ce, n in (("loss_text", "text_ce_sum", "text_tokens"), ("loss_image", "image_ce_sum", "image_tokens")):
        if r[n].sum() > 0:
            scores[key] = float(r[ce].sum() / r[n].sum())
    for i, kind in enumerate(kinds):
        sel = answered & (r["kind"] == i)
        if sel.any():
            scores[f"accuracy_{kind}"] = float(r["correct"][sel].mean())
            scores[f"answer_mode/{kind}"] = answer_mode_share(r["first_answer"][sel])
    if "router_hits" in r:  # TA-MoE: task-router accuracy per layer, expert load shares per group
        acc = r["router_hits"].sum(0) / max(r["router_tokens"].sum(), 1)
        scores["router_acc"] = float(acc.mean())
        scores.update({f"router_acc/layer{i}": float(a) for i, a in enumerate(acc)})
        load = r["expert_load"].sum(0)                              # [L, 2N]
        n = load.shape[1] // 2
        for i, row in enumerate(load):
            for g, name in enumerate(contract.TASKS):
                share = row[g * n:(g + 1) * n] / max(row[g * n:(g + 1) * n].sum(), 1)
                scores.update({f"load/layer{i}/{name}{e}": float(v) for e, v in enumerate(share)})
    return scores


def code_prior_loss(fit: np.ndarray, held_out: np.ndarray, num_codes: int) -> float:
    """Image-code cross-entropy (nats per code) of the best prompt-blind generator: each image slot's
    code frequencies over the `fit` images' codes `[N, slots]` (add-half smoothing over `num_codes`),
    scored on `held_out` `[M, slots]`. It knows where the background and objects usually are, but not
    what the prompt asks for: a T2I model must beat it to show it reads the prompt."""
    slots = fit.shape[1]
    counts = np.full((slots, num_codes), 0.5)
    np.add.at(counts, (np.broadcast_to(np.arange(slots), fit.shape), fit), 1.0)
    logp = np.log(counts / counts.sum(1, keepdims=True))
    return float(-logp[np.arange(slots)[None], held_out].mean())


def answer_mode_share(first_answers: np.ndarray) -> float:
    """Share of the most frequent predicted first answer token among a kind's questions: 1.0 means
    one answer for every question (the model reads neither the image nor the question's specifics),
    whatever its accuracy happens to be on that slice."""
    _, counts = np.unique(np.asarray(first_answers), return_counts=True)
    return float(counts.max() / counts.sum())


@register("shapes_heldout")
class ShapesHeldout(Evaluator):
    """Held-out shapes scenes (a seed the training stream never uses), every `train.eval_every` steps.

    lm: understanding accuracy (exact-match answers, overall and per question kind) next to the
    image-blind baseline's (`shapes.blind_baseline`: chance for this question mix), per kind the
    share of its most frequent predicted answer (`answer_mode/<kind>`), and the image-code loss.
    vq: reconstruction error, and the share of reconstructions on which the detector finds exactly
    the scene's objects.
    """

    prefix = "eval/"

    @classmethod
    def create(cls, ctx: Context):
        if ctx.config.data.source != "shapes" or not ctx.heldout:
            return None  # the user's data has its own held-out evaluators, and so may an objective
        return cls(ctx)

    def __init__(self, ctx: Context):
        config, graphdef, layout = ctx.config, ctx.graphdef, ctx.layout
        self.config, self.mesh, self.kinds = config, ctx.mesh, tuple(shapes.KINDS)
        self.every = int(config.train.eval_every)
        self.seed = config.seed + HELD_OUT_SEED_OFFSET
        n = config.train.eval_batches * config.train.batch_size
        self.objective = ctx.heldout  # lm | vq
        if self.objective == "lm":
            self.batches = heldout_batches(config, ctx.tokenizer, layout, self.kinds)
            self.device_batches = device_rows(config, self.batches)
            eval_fn, scale = ctx.eval_fn, ctx.lora_scale
            self._fn = jax.jit(lambda p, f, b: eval_fn(merged_model(graphdef, p, f, scale), b))
            # the image-blind answerer's accuracy on this question mix: the chance level to beat
            blind = dict(shapes.blind_baseline(datasets.question_kinds(config.data) or None, seed=self.seed,
                                               fit=10000, held_out=2000))
            self.blind = {"blind_accuracy": blind.pop("accuracy")}
            self.blind.update({f"blind/{k}": v for k, v in blind.items()})
            # the prompt-blind generator's image-code loss (`code_prior_loss`): chance for the T2I task
            self.fit_images, self.blind_images = (
                np.stack([shapes.render(shapes.scene_at(seed, i, layout.image_size))
                          for i in range(n_img)]).astype(np.float32) / 127.5 - 1
                for seed, n_img in ((config.seed + 11, 768), (self.seed + 11, 256))
            ) if config.data.gen_ratio > 0 else (None, None)
            self._codes = jax.jit(lambda p, f, x: merged_model(graphdef, p, f).vqmodel.encode(x).reshape(x.shape[0], -1))
            self._blind_loss_image = None
            vq = ctx.model_cfg.vq
            self.num_codes = int(getattr(vq, "num_embeddings", 0) or vq.codebook_size)
        else:
            size = layout.image_size
            self.scenes = [shapes.scene_at(self.seed, i, size) for i in range(n)]
            self.images = np.stack([shapes.render(s) for s in self.scenes]).astype(np.float32) / 127.5 - 1

            def recon(p, f, x):
                vq = merged_model(graphdef, p, f).vqmodel
                r, _ = vq_loss.vq_forward(vq, x)
                return r

            self._fn = jax.jit(recon)

    def __call__(self, params, frozen) -> dict[str, float]:
        if self.objective == "lm":
            return self._lm(params, frozen)
        return self._vq(params, frozen)

    def _lm(self, params, frozen) -> dict[str, float]:
        scores = {**lm_scores(run_lm_eval(self, params, frozen), self.kinds), **self.blind}
        if self.fit_images is not None:
            vq_trains = "vqmodel" in set(params.keys())
            if self._blind_loss_image is None or vq_trains:  # a frozen VQ's codes never change: computed once
                fit, held = (np.concatenate([to_host(self._codes(params, frozen, x[i:i + 256]))
                                             for i in range(0, len(x), 256)]) for x in (self.fit_images, self.blind_images))
                self._blind_loss_image = code_prior_loss(fit, held, self.num_codes)
            scores["blind_loss_image"] = self._blind_loss_image
        return scores

    def _vq(self, params, frozen) -> dict[str, float]:
        bs = self.config.train.batch_size
        recons = [to_host(self._fn(params, frozen, self.images[i:i + bs])) for i in range(0, len(self.images), bs)]
        recon = np.concatenate(recons)
        pixels = np.clip(np.round((recon + 1) * 127.5), 0, 255).astype(np.uint8)
        matched = [shapes.match_scene(s, shapes.detect(p)) for s, p in zip(self.scenes, pixels)]
        return {"recon_mse": float(np.mean((recon - self.images) ** 2)), "detector_match": float(np.mean(matched))}


# -- held-out user data -------------------------------------------------------------------------------

def files_heldout_batches(config, tokenizer, layout: pipeline.Layout) -> list[dict]:
    """`train.eval_batches` host batches of the user's held-out data (`data.eval_mmu_json` /
    `data.eval_t2i_jsonl`, or the `data.eval_split` end of each training file), both tasks mixed by
    the run's ratios, one sample per row; [] when none is configured."""
    return first_batches(config, tokenizer, layout, part="heldout")


@register("files_heldout")
class FilesHeldout(Evaluator):
    """The user's held-out data (`data.source=files`), every `train.eval_every` steps: understanding
    exact-match accuracy under teacher forcing, the held-out text (answer) and image-code losses,
    and for TA-MoE the task-router accuracy and expert loads (`heldout/`). Declines without
    held-out data (`data.eval_split` = 0 and no `data.eval_*` files) or with another objective."""

    label = "heldout"
    prefix = "heldout/"

    @classmethod
    def create(cls, ctx: Context):
        if ctx.config.data.source != "files" or ctx.heldout != "lm":
            return None
        batches = files_heldout_batches(ctx.config, ctx.tokenizer, ctx.layout)
        return cls(ctx, pipeline.distinct_rows(batches)) if batches else None

    def __init__(self, ctx: Context, batches: list[dict]):
        self.config, self.mesh, self.every = ctx.config, ctx.mesh, int(ctx.config.train.eval_every)
        self.batches, self.device_batches = batches, device_rows(ctx.config, batches)
        graphdef, eval_fn, scale = ctx.graphdef, ctx.eval_fn, ctx.lora_scale
        self._fn = jax.jit(lambda p, f, b: eval_fn(merged_model(graphdef, p, f, scale), b))
        # held-out records skipped (bad or too long), each once: reported apart from training's
        self.skipped = list({(e["source"], e["index"]): e for b in batches for e in pipeline.skipped_in(b)}.values())

    def __call__(self, params, frozen) -> dict[str, float]:
        return {**lm_scores(run_lm_eval(self, params, frozen)), "skipped_records": float(len(self.skipped))}


# -- benchmark suites -----------------------------------------------------------------------------

def suite_options(config, image_size: int) -> suites.Options:
    """`eval_suites.*` as `unijax.inference.suites.Options` (the training run's seed)."""
    e = config.eval_suites
    return suites.Options(seed=config.seed, size=image_size, num_images=e.num_images, num_questions=e.num_questions,
                          per_tag=e.per_tag, samples=e.samples, cfg=e.cfg,
                          files=tuple(f for f in e.files.split(",") if f), image_root=e.image_root)


def run_suites(config, model, tokenizer, image_size: int) -> dict[str, float]:
    """Every `eval_suites.names` suite on `model`: {"<suite>/<metric path>": value} (numbers only)."""
    engine = Engine(model, tokenizer, batch_size=config.eval_suites.batch_size)
    o = suite_options(config, image_size)
    out: dict[str, float] = {}

    def put(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for name in config.eval_suites.names:
        put(name, suites.run(name, engine, o, chunk=4 * config.eval_suites.batch_size))
    return out


@register("suites")
class Suites(Evaluator):
    """The `eval_suites.names` benchmark suites on the current model (LoRA merged), every
    `eval_suites.every` steps (0: `train.eval_every`); single-process runs only."""

    label = "suites"
    prefix = "suite/"

    @classmethod
    def validate(cls, config) -> None:
        e = config.eval_suites
        bad = [n for n in e.names if n not in suites.SUITES]
        if bad:
            raise ValueError(f"eval_suites.names={tuple(e.names)}: {bad} not among {suites.SUITES}")
        for key in ("num_images", "num_questions", "per_tag", "samples", "batch_size"):
            if e.names and int(e[key]) <= 0:
                raise ValueError(f"eval_suites.{key}={e[key]} must be positive")
        if e.every < 0:
            raise ValueError(f"eval_suites.every={e.every} must be >= 0 (0 = train.eval_every)")
        if any(not n.startswith("shapes_") for n in e.names) and not e.files:
            raise ValueError(f"eval_suites.names={tuple(e.names)} includes a file suite: set eval_suites.files")
        if e.names and jax.process_count() > 1:
            raise ValueError("eval_suites.names: benchmark suites run in single-process training only; evaluate "
                             "the checkpoint with python -m unijax.evaluate")

    @classmethod
    def create(cls, ctx: Context):
        return cls(ctx) if ctx.config.eval_suites.names else None

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.every = int(ctx.config.eval_suites.every or ctx.config.train.eval_every)

    def __call__(self, params, frozen) -> dict[str, float]:
        c = self.ctx
        model = nnx.merge(c.graphdef, *lora.materialize(params, frozen, c.lora_scale))
        return run_suites(c.config, model, c.tokenizer, c.layout.image_size)

    def summary(self, scores: dict[str, float]) -> str:
        return " ".join(f"{k}={v:.4f}" for k, v in scores.items() if k.count("/") <= 2 and not k.endswith("/n"))
