"""The training loop every stage runs through: `train(config)`.

Builds the mesh, the model (fresh or `init_from`), the trainable/frozen split, optax, the data
iterator and the Orbax CheckpointManager; resumes from the latest checkpoint in
`<workdir>/checkpoints` when there is one (same command, same results); runs the jitted step;
logs, evaluates and checkpoints; finally writes the trained model to `<workdir>/model` (a unijax
model checkpoint that `init_from`, `unijax.generate` and `unijax.convert --to_hf` read).
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from unijax import checkpoints as model_ckpt
from unijax import sharding
from unijax.data import datasets, pipeline, shapes
from unijax.data.tokenizer import check_compatible, load_tokenizer
from unijax.inference import suites
from unijax.models import family, lora
from unijax.models.config import RUNTIME_KEYS, JanusConfig, preset, runtime_overrides
from unijax.models.janus import Janus
from unijax.training import aia, steps, vision_pretrain
from unijax.training import setup as train_setup
from unijax.training.checkpointing import TrainCheckpoints
from unijax.training.logger import MetricLogger
from unijax.training.params import count

ARCH_KEYS = ("text", "vision", "vq", "image_token_id", "boi_token_id", "eoi_token_id")


class NonFiniteLossError(FloatingPointError):
    pass


def model_config(config) -> JanusConfig:
    """`model.preset` of `model.family` with every set (non-None) `model.*` architecture key and the
    runtime keys on top (an Emu3 model has no `model.vision.*`, and only the `model.vq.*` keys its
    tokenizer shares with Janus's)."""
    m = config.model
    family = m.get("family", "janus")
    overrides: dict[str, Any] = {}
    for key in ARCH_KEYS:
        value = m[key]
        if isinstance(value, ml_collections.ConfigDict):
            value = {k: v for k, v in value.to_dict().items() if v is not None}
            if value and family == "emu3" and key != "text":
                import dataclasses

                from unijax.models.emu3_config import Emu3VQConfig

                known = {f.name for f in dataclasses.fields(Emu3VQConfig)} if key == "vq" else set()
                bad = sorted(set(value) - known)
                if bad:
                    raise ValueError(f"model.{key}.{bad[0]}: model.family=emu3 has no such key (Emu3 models have "
                                     f"no model.vision.*; their model.vq keys are {sorted(known) or 'fixed'})")
            if value:
                overrides[key] = value
        elif value is not None:
            overrides[key] = value
    overrides.update({k: m[k] for k in RUNTIME_KEYS})
    overrides["ffn"] = m.ffn
    if m.ffn == "ta_moe":
        moe = config.moe.to_dict()
        moe["layers"] = tuple(moe["layers"] or ())
        overrides["moe"] = moe
    return preset(m.preset, family, **overrides)


def validate(config) -> None:
    """Checks that need no compile: everything a typo or an impossible size would break later."""
    t = config.train
    for key in ("steps", "batch_size", "checkpoint_every", "log_every", "eval_every", "keep_checkpoints"):
        if int(t[key]) <= 0:
            raise ValueError(f"train.{key}={t[key]} must be positive")
    if not 0 <= config.data.cfg_drop_prob < 1:
        raise ValueError(f"data.cfg_drop_prob={config.data.cfg_drop_prob} must be in [0, 1)")
    if config.objective not in ("lm", "vq"):
        raise ValueError(f"objective={config.objective!r}: expected 'lm' or 'vq'")
    lo = config.model.lora
    if lo.rank < 0 or (lo.rank and not (lo.alpha > 0 and 0 <= lo.dropout < 1)):
        raise ValueError(f"model.lora: rank={lo.rank} (>= 0), alpha={lo.alpha} (> 0) and dropout={lo.dropout} "
                         f"(in [0, 1)) are out of range")
    if config.data.num_workers < 0:
        raise ValueError(f"data.num_workers={config.data.num_workers} must be >= 0")
    vision_pretrain.validate(config)
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


def suite_options(config, image_size: int) -> suites.Options:
    """`eval_suites.*` as `unijax.inference.suites.Options` (the training run's seed)."""
    e = config.eval_suites
    return suites.Options(seed=config.seed, size=image_size, num_images=e.num_images, num_questions=e.num_questions,
                          per_tag=e.per_tag, samples=e.samples, cfg=e.cfg,
                          files=tuple(f for f in e.files.split(",") if f), image_root=e.image_root)


def run_suites(config, model, tokenizer, image_size: int) -> dict[str, float]:
    """Every `eval_suites.names` suite on `model`: {"<suite>/<metric path>": value} (numbers only)."""
    from unijax.inference.engine import Engine

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


def _initial_model(cfg: JanusConfig, config, log: MetricLogger) -> Janus:
    if config.init_from:
        log.info(f"init_from {config.init_from}")
        saved = model_ckpt.read_config(config.init_from)
        runtime = runtime_overrides(saved, cfg)
        if saved.replace(**runtime) != cfg:
            raise ValueError(f"init_from={config.init_from} holds a different architecture than model.* / moe.* "
                             f"(saved: {saved}); set model.preset / model.* / moe.* to match it")
        return model_ckpt.load_model(config.init_from, **runtime)
    return family.build(cfg, nnx.Rngs(config.seed))


def _to_host(tree):
    """numpy copies of a tree of (possibly multi-process) arrays; with several processes every one
    must call it (arrays spread over other hosts are all-gathered)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def train(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the configured training. Returns the final metrics."""
    validate(config)
    cfg = model_config(config)
    aia_settings = aia.settings(config, cfg.text.num_layers)  # target files and spans checked before any compile
    if aia_settings and aia_settings["impl"] == "explicit" and cfg.attention_impl != "xla":
        raise ValueError(f"aia.impl='explicit' needs model.attention_impl='xla' (got {cfg.attention_impl!r}); "
                         f"use aia.impl='lean'")
    if config.eval_suites.names and jax.process_count() > 1:
        raise ValueError("eval_suites.names: benchmark suites run in single-process training only; evaluate the "
                         "checkpoint with python -m unijax.evaluate")
    mesh = sharding.make_mesh(config.mesh, devices)
    n_batch_shards = sharding.num_batch_shards(mesh)
    if config.train.batch_size % n_batch_shards:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by mesh.data x mesh.fsdp x "
                         f"mesh.expert = {n_batch_shards}")
    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = MetricLogger(workdir, config.train.steps)

    tokenizer = load_tokenizer(config.data.tokenizer, config.data.dir)
    check_compatible(tokenizer, cfg)
    layout = pipeline.Layout.from_model(cfg, config.data.max_len, config.data.cfg_drop_prob)
    images_per_row = layout.images_per_row(config.data.packing)

    # -- model, trainable split, shardings ------------------------------------------------------
    ckpts = TrainCheckpoints(workdir / "checkpoints", config)
    model = _initial_model(cfg, config, log)
    if config.vision_pretrain.steps:  # a loaded tower is already trained; Emu3 has no understanding encoder
        skip = "init_from is set" if config.init_from else (
            "model.family=emu3" if family.family_of(cfg) == "emu3" else "")
        if skip:
            log.info(f"vision pre-training skipped: {skip}")
        else:
            vision_pretrain.pretrain_vision(model, config, mesh, log, cache_dir=workdir / "vision_pretrain")
    setup = train_setup.build(model, config, mesh)
    del model
    graphdef, state, frozen = setup.graphdef, setup.state, setup.frozen
    params = state["params"]
    lcfg = config.model.lora
    if lcfg.rank:
        log.info(f"LoRA rank {lcfg.rank} (alpha {lcfg.alpha}) on {len(jax.tree.leaves(params['lora'])) // 2} "
                 f"frozen matrices: {lora.count(params['lora']):,} adapter parameters")
    log.info(f"model {config.model.preset}: {count(params) + count(frozen):,} parameters, "
             f"{count(params):,} trainable; mesh {dict(mesh.shape)}")

    # -- data ------------------------------------------------------------------------------------
    per_process = config.train.batch_size // jax.process_count()
    kinds = tuple(shapes.KINDS)
    dsets, weights = datasets.task_datasets(config.data, layout.image_size, config.seed)
    train_ds = pipeline.batches(dsets, weights, tokenizer=tokenizer, layout=layout, batch_size=per_process,
                                seed=config.seed, packing=config.data.packing, num_workers=config.data.num_workers,
                                prefetch=config.data.prefetch, kinds=kinds, process_index=jax.process_index(),
                                process_count=jax.process_count())
    data_iter = iter(train_ds)

    # -- resume ----------------------------------------------------------------------------------
    start = 0
    if ckpts.latest_step() is not None:
        state = ckpts.restore(state, data_iter)
        start = int(state["step"])
        log.info(f"resumed from {ckpts.path_of(start)} at step {start}")
    ckpts.write_config(workdir / "config.json")

    # -- steps -----------------------------------------------------------------------------------
    loss_fn, eval_fn = steps.objective(config, images_per_row, cfg.text.num_layers)
    lora_scale = setup.lora_scale
    train_step = train_setup.jit_train_step(setup, config, mesh, loss_fn)
    evaluator = steps.Evaluator(config, graphdef, eval_fn, tokenizer, layout, mesh, kinds) \
        if config.data.source == "shapes" else None

    suite_every = (config.eval_suites.every or config.train.eval_every) if config.eval_suites.names else 0
    log.start_step = start
    stop = _PreemptionFlag()
    skipped = 0
    window: list[dict] = []
    t_window, tokens_window = time.perf_counter(), 0
    metrics: dict[str, float] = {}
    with jax.set_mesh(mesh):  # the TA-MoE layer reads the mesh to place its expert buffers
        try:
            for step in range(start + 1, config.train.steps + 1):
                batch = next(data_iter)
                skipped += int(np.sum(batch["bad"]))
                tokens_window += pipeline.tokens_in(batch)
                device_batch = sharding.put_batch({k: batch[k] for k in pipeline.BATCH_KEYS}, mesh)
                state, step_metrics = train_step(state, frozen, device_batch)
                step_metrics = _to_host(step_metrics)
                if not np.isfinite(step_metrics["loss"]):
                    last = ckpts.latest_step()
                    where = f"{ckpts.path_of(last)} (step {last})" if last is not None else "none (no checkpoint yet)"
                    raise NonFiniteLossError(f"non-finite loss {step_metrics['loss']} at step {step}; last good "
                                             f"checkpoint: {where}. Lower train.learning_rate or raise "
                                             f"train.warmup_steps")
                window.append(step_metrics)
                if step % config.train.log_every == 0 or step == config.train.steps:
                    elapsed = time.perf_counter() - t_window
                    metrics = _window_mean(window)
                    metrics["tokens_per_s"] = tokens_window / max(elapsed, 1e-9)
                    metrics["skipped_records"] = skipped
                    log.write(step, metrics)
                    log.progress(step, metrics, metrics["tokens_per_s"])
                    window, t_window, tokens_window = [], time.perf_counter(), 0
                if evaluator is not None and (step % config.train.eval_every == 0 or step == config.train.steps):
                    scores = evaluator(state["params"], frozen)
                    log.write(step, scores, prefix="eval/")
                    log.info("eval " + " ".join(f"{k}={v:.4f}" for k, v in scores.items() if "/" not in k))
                    metrics.update({"eval/" + k: v for k, v in scores.items()})
                if suite_every and (step % suite_every == 0 or step == config.train.steps):
                    model_now = nnx.merge(graphdef, *lora.materialize(state["params"], frozen, lora_scale))
                    scores = run_suites(config, model_now, tokenizer, layout.image_size)
                    log.write(step, scores, prefix="suite/")
                    log.info("suites " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()
                                                  if k.count("/") <= 2 and not k.endswith("/n")))
                    metrics.update({"suite/" + k: v for k, v in scores.items()})
                preempted = stop.requested()
                if step % config.train.checkpoint_every == 0 or step == config.train.steps or preempted:
                    ckpts.save(step, state, data_iter)
                if preempted:  # SIGTERM (preemption): this step is done and checkpointed; stop cleanly
                    ckpts.wait()
                    log.info(f"SIGTERM: stopped after step {step}; checkpoint {ckpts.path_of(step)} written. "
                             f"Rerun the same command to resume")
                    return dict(metrics, preempted_at_step=step)
            ckpts.wait()
            host_params, host_frozen = _to_host(state["params"]), _to_host(frozen)  # every process gathers
            if jax.process_index() == 0:
                _export(workdir / "model", graphdef, host_params, host_frozen, lora_scale)
            log.info(f"model written to {workdir / 'model'}")
            if lcfg.rank and jax.process_index() == 0:
                _export_adapters(workdir / "adapters", cfg, config, graphdef, host_params, host_frozen)
                log.info(f"LoRA adapters (unmerged) written to {workdir / 'adapters'}")
        finally:
            stop.restore()
            ckpts.close()
            if hasattr(data_iter, "close"):  # stops grain's prefetch thread / worker processes
                data_iter.close()
            log.close()
    return metrics


class _PreemptionFlag:
    """SIGTERM (a preempted VM, `scancel`, `kill`) sets a flag the loop reads after each step: it
    finishes the step, writes a checkpoint and returns. With several processes the flag is or-ed
    over all of them, so every process stops after the same step. The previous handler is restored
    when training ends."""

    def __init__(self):
        import signal
        import threading

        self.flag = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))

    def restore(self) -> None:
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def _window_mean(window: list[dict]) -> dict[str, float]:
    """Token-weighted task losses, plain means for the rest. A task with no tokens in the window (an
    understanding-only run has no image tokens) gets no loss entry rather than a nan."""
    out = {}
    for key in window[0]:
        out[key] = float(np.mean([m[key] for m in window]))
    for task, n in (("loss_text", "text_tokens"), ("loss_image", "image_tokens")):
        if task in window[0] and n in window[0]:
            total = sum(float(m[n]) for m in window)
            if total:
                out[task] = sum(float(m[task]) * float(m[n]) for m in window) / total
            else:
                del out[task]
    return out


def _export_adapters(out: pathlib.Path, cfg: JanusConfig, config, graphdef, params, frozen) -> None:
    """The adapters, unmerged, with the fully trained parameters (`unijax.checkpoints.save_adapters`);
    `params` / `frozen` are host copies (`_to_host`)."""
    lcfg = config.model.lora
    targets = lcfg.targets.split(",") if isinstance(lcfg.targets, str) else list(lcfg.targets)
    info = {"rank": int(lcfg.rank), "alpha": float(lcfg.alpha), "scale": lora.scale_of(lcfg),
            "dropout": float(lcfg.dropout), "targets": targets}
    trained = {k: v for k, v in params.items() if k != "lora"}
    if config.init_from:
        model_ckpt.save_adapters(out, cfg, params["lora"], trained, info, base=config.init_from)
    else:  # a fresh run: its frozen (random) base weights are part of the result
        base = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, trained, frozen), nnx.Param))
        model_ckpt.save_adapters(out, cfg, params["lora"], trained, info, base_params=base)


def _export(out: pathlib.Path, graphdef, params, frozen, lora_scale: float = 1.0) -> None:
    """The trained model as plain weights: LoRA adapters are merged into the matrices they adapt;
    `params` / `frozen` are host copies (`_to_host`)."""
    model = nnx.merge(graphdef, *lora.materialize(params, frozen, lora_scale))
    model_ckpt.save_model(out, model, overwrite=True)
