"""The small objects the training loop calls each step: the logging window, preemption, export.

`train()` (`unijax.training.loop`) is setup -> loop -> teardown; what happens between steps lives
here and in `unijax.training.evaluators`, so the loop itself knows no dataset and no stage.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import threading
import time

import numpy as np
from flax import nnx

from unijax import checkpoints as model_ckpt
from unijax.data import pipeline, records
from unijax.distributed import any_process, to_host
from unijax.models import lora
from unijax.training import throughput
from unijax.training.checkpointing import TrainCheckpoints
from unijax.training.logger import MetricLogger


class NonFiniteLossError(FloatingPointError):
    pass


class MetricsWindow:
    """Step metrics between two log steps. They stay on the device as the steps run (the loop never
    waits on the host between log steps) and come to the host in one transfer (`fetch`) at a log
    step, before a checkpoint or an evaluation, and at the end; each fetched step's loss is checked
    then, in step order. Every `train.log_every` steps and at the last, the window is written as one
    line (and one metrics.jsonl / TensorBoard record) with its speed (`unijax.training.throughput`)."""

    def __init__(self, log: MetricLogger, log_every: int, last_step: int, ckpts: TrainCheckpoints,
                 flops_per_device: float = 0.0, peak_tflops: float | None = None, local_devices: int = 1):
        self.log, self.log_every, self.last_step, self.ckpts = log, int(log_every), int(last_step), ckpts
        self.flops_per_device, self.peak_tflops = float(flops_per_device), peak_tflops
        self.local_devices = int(local_devices)  # the devices this process's batch rows go to
        self.skipped = self.overflow = 0
        self.skips = records.SkippedRecords()
        self.latest: dict[str, float] = {}
        self.pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
        self._reset()

    def _reset(self) -> None:
        self.window: list[dict] = []
        self.t0, self.tokens, self.paused_s = time.perf_counter(), 0, 0.0

    def add_batch(self, batch: dict[str, np.ndarray]) -> None:
        """A host batch about to be trained on: its tokens and skipped records, each record counted
        once however often the epochs bring it back."""
        self.skips.add(pipeline.skipped_in(batch))  # every pipeline batch names its skipped samples, packed or not
        self.skipped, self.overflow = self.skips.count("bad_record"), self.skips.count("overflow")
        self.tokens += pipeline.tokens_in(batch)

    def add(self, step: int, metrics: dict) -> bool:
        """One step's metrics (device arrays, left where they are until a fetch). Returns whether this
        step wrote a log line (after fetching and checking every pending step)."""
        self.pending.append((step, metrics))
        if step % self.log_every == 0 or step == self.last_step:
            self.fetch()
            self.flush(step)
            return True
        return False

    def fetch(self) -> None:
        """The pending steps' metrics to the host in one `to_host`, losses checked in step order: the
        first non-finite one stops the run naming its step and the last good checkpoint (the loop
        fetches before every save, so that checkpoint is from before the bad step)."""
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        host = to_host([m for _, m in self.pending])
        self.pending = []
        for step, metrics in zip(steps, host):
            if not np.isfinite(metrics["loss"]):
                last = self.ckpts.latest_step()
                where = f"{self.ckpts.path_of(last)} (step {last})" if last is not None else "none (no checkpoint yet)"
                raise NonFiniteLossError(f"non-finite loss {metrics['loss']} at step {step}; last good checkpoint: "
                                         f"{where}. Lower train.learning_rate or raise train.warmup_steps")
            self.window.append(metrics)

    @contextlib.contextmanager
    def paused(self):
        """Time that is not training (compiling the step, evaluations, checkpoint saves): left out of
        the window's step time and tokens/s."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def flush(self, step: int) -> None:
        elapsed = max(time.perf_counter() - self.t0 - self.paused_s, 1e-9)
        metrics = window_mean(self.window)
        metrics["tokens_per_s"] = self.tokens / elapsed
        metrics.update(throughput.rates(self.tokens, elapsed, len(self.window), self.flops_per_device,
                                        self.peak_tflops, self.local_devices))
        metrics["skipped_records"] = self.skipped
        metrics["overflow_skipped"] = self.overflow
        self.log.write(step, metrics)
        self.log.progress(step, metrics)
        self.latest = metrics
        self._reset()


def window_mean(window: list[dict]) -> dict[str, float]:
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


class PreemptionFlag:
    """SIGTERM (a preempted VM, `scancel`, `kill`) sets a flag the loop reads after each step: it
    finishes the step, writes a checkpoint and returns. With several processes the flag is or-ed
    over all of them, so every process stops after the same step; that collective waits for the
    device, so the loop reads it only at log and checkpoint steps (a SIGTERM then stops the run
    within `train.log_every` steps). The previous handler is restored when training ends."""

    def __init__(self):
        self.flag = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        return any_process(self.flag)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def export_model(out: pathlib.Path, graphdef, params, frozen, lora_scale: float = 1.0,
                 extra_files: dict[str, bytes] | None = None) -> None:
    """The trained model as plain weights: LoRA adapters are merged into the matrices they adapt;
    `params` / `frozen` are host copies (`unijax.distributed.to_host`); `extra_files` (the tokenizer)
    go in with them."""
    model = nnx.merge(graphdef, *lora.materialize(params, frozen, lora_scale))
    model_ckpt.save_model(out, model, extra_files, overwrite=True)


def export_adapters(out: pathlib.Path, cfg, config, graphdef, params, frozen) -> None:
    """The adapters, unmerged, with the fully trained parameters (`unijax.checkpoints.save_adapters`);
    `params` / `frozen` are host copies."""
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

