"""The training loop every stage runs through: `train(config)`, as setup -> loop -> teardown.

Setup validates the config (`unijax.training.config.validate`), builds the mesh, the model (fresh
or `init_from`; a fresh Janus first runs its vision pre-training phase when configured, then its
adaptor warm-up with the decoder frozen), the
trainable/frozen split with optax and explicit shardings (`unijax.training.setup`, shared with
`unijax.plan`), the data iterator, the Orbax checkpoints (resuming from the latest in
`<workdir>/checkpoints`: same command, same results) and the configured evaluators
(`unijax.training.evaluators`). The loop runs the jitted step and calls the hooks
(`unijax.training.hooks`): the logging window, evaluators, checkpoints, preemption. Teardown
writes the trained model to `<workdir>/model` (a unijax model checkpoint that `init_from`,
`unijax.generate` and `unijax.convert --to_hf` read) and, with LoRA, the unmerged adapters to
`<workdir>/adapters`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from unijax import checkpoints as model_ckpt
from unijax import contract, sharding
from unijax.data import pipeline
from unijax.data.tokenizer import HFTokenizer, carried_tokenizer, check_compatible, load_tokenizer, resolve_spec
from unijax.distributed import to_host
from unijax.io import directory_lock, write_outputs
from unijax.models import family, lora
from unijax.models.config import runtime_overrides
from unijax.training import evaluators, objectives, steps, throughput, vision_pretrain
from unijax.training import setup as train_setup
from unijax.training.checkpointing import TrainCheckpoints
from unijax.training.config import model_config, validate, with_checkpoint_ids
from unijax.training.hooks import MetricsWindow, NonFiniteLossError, PreemptionFlag, export_adapters, export_model
from unijax.training.logger import MetricLogger
from unijax.training.params import count
from unijax.training.upcycle import architecture_differences

__all__ = ["NonFiniteLossError", "train"]


@dataclasses.dataclass
class Run:
    """What setup builds and the loop and teardown use."""

    config: ml_collections.ConfigDict
    cfg: Any                                  # the model config
    mesh: jax.sharding.Mesh
    workdir: pathlib.Path
    log: MetricLogger
    setup: train_setup.Setup
    ckpts: TrainCheckpoints
    data_iter: Any
    train_step: Any
    evaluators: list
    start: int
    tokenizer: Any = None                     # a transformers one is exported with the model
    flops_per_step: float = 0.0               # model FLOPs of one step, all devices (unijax.training.throughput)
    peak_tflops: float | None = None          # per device; None: MFU is not logged


def train(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the configured training, after its adaptor warm-up when it has one
    (`warm_up_adaptors`). Returns the final metrics."""
    with directory_lock(config.workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(config, devices)


def _train(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None) -> dict[str, Any]:
    warm_up_adaptors(config, devices)
    run = setup(config, devices)
    stop = PreemptionFlag()
    try:
        with jax.set_mesh(run.mesh):  # the TA-MoE layer reads the mesh to place its expert buffers
            metrics, preempted_at = loop(run, stop)
            if preempted_at is not None:
                return dict(metrics, preempted_at_step=preempted_at)
            export(run)
    finally:
        stop.restore()
        run.ckpts.close()
        if hasattr(run.data_iter, "close"):  # stops grain's prefetch thread / worker processes
            run.data_iter.close()
        run.log.close()
    return metrics


def adaptor_warmup_dir(config) -> pathlib.Path | None:
    """`<workdir>/adaptor_warmup` when the run has an adaptor warm-up: `adaptor_warmup.steps` > 0 and the
    run pre-trains its vision tower (a fresh Janus, or one from a stage-0 model: its adaptors are new too)."""
    if not config.adaptor_warmup.steps or vision_pretrain.skip_reason(config, config.model.get("family", "janus")):
        return None
    return pathlib.Path(config.workdir) / "adaptor_warmup"


def warm_up_adaptors(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    """Janus-Pro's stage I before the run: its vision pre-training, then `adaptor_warmup.steps` steps of the
    run's data and objective with the decoder frozen (`adaptor_warmup.frozen`), so that the aligners and the
    generation embeddings and head learn to map onto a decoder that already knows the language before the
    decoder itself moves (docs/shapes_testbed.md, "An adaptor warm-up"). Trained in
    `<workdir>/adaptor_warmup` (resumable; reused once its `DONE` is written); the run then starts from its
    model (`setup`). Nothing to do without a warm-up (`adaptor_warmup_dir`)."""
    workdir = adaptor_warmup_dir(config)
    if workdir is None or (workdir / "DONE").is_file():
        return
    a = config.adaptor_warmup
    sub = config.copy_and_resolve_references()
    sub.workdir = str(workdir)
    sub.adaptor_warmup.steps = 0
    sub.eval_suites.names = ()
    sub.train.steps = sub.train.eval_every = sub.train.checkpoint_every = int(a.steps)
    sub.train.warmup_steps = min(int(config.train.warmup_steps), int(a.steps))
    sub.train.frozen = tuple(config.train.frozen) + tuple(a.frozen)
    print(f"== adaptor warm-up: {a.steps} steps with {', '.join(a.frozen)} frozen -> {workdir}", flush=True)
    train(sub, devices)
    if jax.process_index() == 0:
        (workdir / "DONE").write_text("{}")


def initial_model(cfg, config, log: MetricLogger, warmed: pathlib.Path | None = None):
    """The adaptor warm-up's model (`warmed`: its directory), `init_from` (loaded with this run's runtime
    keys) or a fresh model of `cfg`; with the warm-up's, the vision tower is already pre-trained."""
    source = str(warmed / "model") if warmed is not None else config.init_from
    if source:
        log.info(f"init_from {source}" + (" (the adaptor warm-up's model)" if warmed is not None else ""))
        saved = model_ckpt.read_config(source)
        runtime = runtime_overrides(saved, cfg)
        if saved.replace(**runtime) != cfg:
            if type(saved) is not type(cfg):
                diff = [f"family: {family.family_of(saved)!r} (checkpoint) != {family.family_of(cfg)!r} (model.family)"]
            else:
                diff = [f"{'' if d.startswith('moe.') else 'model.'}{d.replace(' != ', ' (checkpoint) != ', 1)} (this run)"
                        for d in architecture_differences(saved.replace(**runtime), cfg)]
            raise ValueError(f"init_from={source} holds a different architecture than this run's config: "
                             f"{'; '.join(diff)}; set those keys, or model.preset=checkpoint to take the "
                             f"checkpoint's own")
        return model_ckpt.load_model(source, **runtime)
    return family.build(cfg, nnx.Rngs(config.seed))


def setup(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Run:
    validate(config)
    cfg = model_config(config)
    if config.init_from:  # special ids come from the checkpoint (and are checked against the tokenizer)
        cfg = with_checkpoint_ids(config, cfg, model_ckpt.read_config(config.init_from))
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch("train.batch_size", config.train.batch_size, mesh)
    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = MetricLogger(workdir, config.train.steps)

    tokenizer = load_tokenizer(resolve_spec(config.data.tokenizer, config.init_from), config.data.dir)
    check_compatible(tokenizer, cfg)
    layout = pipeline.Layout.for_data(cfg, config.data)
    images_per_row = layout.images_per_row(config.data.packing)

    # -- model, trainable split, shardings ------------------------------------------------------
    ckpts = TrainCheckpoints(workdir / "checkpoints", config)
    warmed = adaptor_warmup_dir(config)
    model = initial_model(cfg, config, log, warmed)
    if warmed is None:  # else the warm-up pre-trained the tower
        vision_pretrain.maybe_pretrain(model, config, mesh, log, cache_dir=workdir / "vision_pretrain")
    objective = objectives.get(config)
    built = train_setup.build(model, config, mesh, reference=objective.uses_reference)
    del model
    params, frozen = built.state["params"], steps.without_reference(built.frozen)
    lcfg = config.model.lora
    if lcfg.rank:
        log.info(f"LoRA rank {lcfg.rank} (alpha {lcfg.alpha}) on {len(jax.tree.leaves(params['lora'])) // 2} "
                 f"frozen matrices: {lora.count(params['lora']):,} adapter parameters")
    log.info(f"model {config.model.preset}: {count(params) + count(frozen):,} parameters, "
             f"{count(params):,} trainable; mesh {dict(mesh.shape)}")

    # -- data ------------------------------------------------------------------------------------
    dsets, weights = objective.datasets(config, layout.image_size, config.seed)
    data_iter = iter(pipeline.batches(
        dsets, weights, tokenizer=tokenizer, layout=layout, batch_size=config.train.batch_size // jax.process_count(),
        encoder=objective.encoder(tokenizer, layout),
        seed=config.seed, packing=config.data.packing, num_workers=config.data.num_workers,
        prefetch=config.data.prefetch, process_index=jax.process_index(), process_count=jax.process_count(),
        read_threads=config.data.read_threads, read_ahead=config.data.read_ahead))

    # -- resume ----------------------------------------------------------------------------------
    start = 0
    if ckpts.latest_step() is not None:
        built.state = ckpts.restore(built.state, data_iter)
        start = int(built.state["step"])
        log.info(f"resumed from {ckpts.path_of(start)} at step {start}")
    ckpts.write_config(workdir / "config.json")
    log.start_step = start

    # -- step and evaluators ---------------------------------------------------------------------
    loss_fn, eval_fn = objective.functions(config, images_per_row, cfg.text.num_layers)
    train_step = train_setup.jit_train_step(built, config, mesh, loss_fn)
    context = evaluators.Context(config, built.graphdef, tokenizer, layout, mesh, eval_fn, built.lora_scale, cfg,
                                 objective.heldout)
    flops, peak = step_flops(config, cfg, mesh, layout, built, train_step, log)
    return Run(config, cfg, mesh, workdir, log, built, ckpts, data_iter, train_step, evaluators.build(context), start,
               tokenizer, flops, peak)


def step_flops(config, cfg, mesh, layout, built, train_step, log: MetricLogger) -> tuple[float, float | None]:
    """(model FLOPs of one step over all devices, the peak TFLOP/s per device or None), logged once."""
    batch = throughput.abstract_batch(layout, config.train.batch_size, mesh, objectives.get(config))
    flops = throughput.model_flops(config, cfg, mesh, batch, lambda: train_step.lower(built.state, built.frozen, batch))
    peak = throughput.peak_tflops(config, mesh.devices.flat[0])
    where = (f"peak {peak:g} TFLOP/s per device" if peak else
             f"MFU not logged: no known peak for {mesh.devices.flat[0].device_kind!r} (set train.peak_tflops)")
    log.info(f"model FLOPs per step: {flops / 1e12:.4g} TFLOP ({flops / mesh.size / 1e12:.4g} per device); {where}")
    return flops, peak


def loop(run: Run, stop: PreemptionFlag) -> tuple[dict[str, float], int | None]:
    """Steps `start + 1 .. train.steps`. -> (the last logged metrics and evaluations, the step a
    SIGTERM stopped the run after, or None). Step metrics stay on the device until the window fetches
    them: at a log step and before anything a bad step must not reach (an evaluation, a checkpoint)."""
    config, state, frozen = run.config, run.setup.state, run.setup.frozen
    last = int(config.train.steps)
    window = MetricsWindow(run.log, config.train.log_every, last, run.ckpts, run.flops_per_step / run.mesh.size,
                           run.peak_tflops, len(run.mesh.local_devices))
    scores: dict[str, float] = {}
    with window.paused():  # not training time
        start_scores = evaluate_at_start(run, state, frozen)
    for step in range(run.start + 1, last + 1):
        batch = next(run.data_iter)
        window.add_batch(batch)
        device_batch = sharding.put_batch({k: batch[k] for k in contract.BATCH_KEYS}, run.mesh)
        # the first call traces and compiles the step: not step time
        with window.paused() if step == run.start + 1 else contextlib.nullcontext():
            state, step_metrics = run.train_step(state, frozen, device_batch)
        run.setup.state = state
        if window.add(step, step_metrics):
            scores = {}  # the returned metrics: the last log line's and the evaluations after it
        for ev in run.evaluators:
            if ev.due(step, last):
                window.fetch()  # a non-finite loss stops the run before it is evaluated
                with window.paused():
                    scores.update(evaluate(run, ev, step, state["params"], frozen))
        # several processes or the flag with a collective, which waits for the device: only where the loop
        # syncs anyway (log and checkpoint steps); one process reads it every step
        synced = step % config.train.log_every == 0 or step % config.train.checkpoint_every == 0 or step == last
        preempted = stop.requested() if jax.process_count() == 1 or synced else False
        if step % config.train.checkpoint_every == 0 or step == last or preempted:
            window.fetch()  # ... or checkpointed: the last checkpoint is always a good one
            with window.paused():
                run.ckpts.save(step, state, run.data_iter)
        if preempted:  # SIGTERM (preemption): this step is done and checkpointed; stop cleanly
            run.ckpts.wait()
            run.log.info(f"SIGTERM: stopped after step {step}; checkpoint {run.ckpts.path_of(step)} written. "
                         f"Rerun the same command to resume")
            report_skipped(run, window)
            return dict(window.latest, **scores), step
    run.ckpts.wait()
    report_skipped(run, window)
    if start_scores:
        run.log.info(start_to_end(start_scores, scores))
    return dict(window.latest, **scores), None


def report_skipped(run: Run, window: MetricsWindow) -> None:
    """The records this run skipped (training, and held-out ones of its evaluators), each once: a
    summary by reason on the console and every record in `<workdir>/skipped.jsonl` (one file per
    process in a multi-process run: `skipped.process<p>.jsonl`)."""
    skips = window.skips
    for ev in run.evaluators:
        skips.add(getattr(ev, "skipped", ()), split="heldout")
    if not skips.records:
        return
    name = "skipped.jsonl" if jax.process_count() == 1 else f"skipped.process{jax.process_index()}.jsonl"
    skips.write(run.workdir / name)
    for line in skips.summary():
        run.log.info(line)
    run.log.info(f"every skipped record (file, index, reason): {run.workdir / name}")


def evaluate(run: Run, ev, step: int, params, frozen, when: str = "") -> dict[str, float]:
    """Runs one evaluator, logs its scores at `step` (metrics.jsonl / TensorBoard and a console line)
    and returns them under the evaluator's prefix."""
    result = ev(params, frozen)
    run.log.write(step, result, prefix=ev.prefix)
    run.log.info(f"{ev.label}{when} {ev.summary(result)}")
    return {ev.prefix + k: v for k, v in result.items()}


START_FILE = "eval_start.json"  # the evaluations before step 1 (train.eval_at_start), kept for a resumed run


def evaluate_at_start(run: Run, state, frozen) -> dict[str, float]:
    """With `train.eval_at_start`: every evaluator on the starting model (logged at step 0), saved to
    `<workdir>/eval_start.json`; a resumed run reads them back. -> {prefixed name: score}."""
    if not run.config.train.eval_at_start:
        return {}
    path = run.workdir / START_FILE
    if run.start > 0 and path.is_file():
        return json.loads(path.read_text())
    out: dict[str, float] = {}
    for ev in run.evaluators:
        out.update({k: float(v) for k, v in evaluate(run, ev, 0, state["params"], frozen, " (start)").items()})
    if jax.process_index() == 0:
        write_outputs(run.workdir, {START_FILE: lambda p: p.write_text(json.dumps(out, indent=1) + "\n")})
    return out


HEADLINE = ("accuracy", "loss_text", "loss_image", "router_acc", "reward_accuracy", "reward_margin")  # of each evaluator
SUITE_HEADLINE = ("accuracy", "yes_ratio", "overall")  # of the benchmark suites (POPE per split, MC, GenEval)


def start_to_end(start: dict[str, float], end: dict[str, float]) -> str:
    """The run's last line with `train.eval_at_start`: each headline score at the start and at the end."""
    parts = []
    for key, value in start.items():
        name = key.rsplit("/", 1)[-1]
        suite_headline = key.startswith("suite/") and name in SUITE_HEADLINE and key.count("/") <= 3
        if key in end and (not key.startswith("suite/") and name in HEADLINE or suite_headline):
            parts.append(f"{key} {value:.4f} -> {end[key]:.4f} ({end[key] - value:+.4f})")
    return "held-out, start -> end: " + ("; ".join(parts) or "no score evaluated at both ends")


def export(run: Run) -> None:
    """`<workdir>/model` (LoRA merged) and, with LoRA, `<workdir>/adapters`, from process 0."""
    s = run.setup
    host_params, host_frozen = to_host(s.state["params"]), to_host(steps.without_reference(s.frozen))  # every process gathers
    if jax.process_index() == 0:
        export_model(run.workdir / "model", s.graphdef, host_params, host_frozen, s.lora_scale,
                     carried_tokenizer(run.tokenizer.source) if isinstance(run.tokenizer, HFTokenizer) else {})
    run.log.info(f"model written to {run.workdir / 'model'}")
    if run.config.model.lora.rank and jax.process_index() == 0:
        export_adapters(run.workdir / "adapters", run.cfg, run.config, s.graphdef, host_params, host_frozen)
        run.log.info(f"LoRA adapters (unmerged) written to {run.workdir / 'adapters'}")
