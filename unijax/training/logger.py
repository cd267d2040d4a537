"""Progress on the console, one JSON object per logged step in `<workdir>/metrics.jsonl`, and
TensorBoard scalars under `<workdir>/tensorboard` (tensorboardX event files)."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Mapping

import jax

# tensorboardX imports torch (about 2 s, every CLI run) only to recognise torch tensors in its image
# and histogram calls; this logger writes Python floats. So unless torch is loaded already, `import
# torch` is made to fail (an ImportError, which tensorboardX handles) while tensorboardX loads.
_TORCH_UNLOADED = "torch" not in sys.modules
if _TORCH_UNLOADED:
    sys.modules["torch"] = None
try:
    from tensorboardX import SummaryWriter
finally:
    if _TORCH_UNLOADED:
        del sys.modules["torch"]


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricLogger:
    def __init__(self, workdir: str | pathlib.Path, total_steps: int, start_step: int = 0):
        self.primary = jax.process_index() == 0
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.primary:
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), flush_secs=10)

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        """Appends `{"step": step, **scalars}` to metrics.jsonl and the TensorBoard log."""
        if not self.primary:
            return
        record = {"step": int(step), **{prefix + k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and math.isfinite(v):
                self._tb.add_scalar(k, v, int(step))

    def progress(self, step: int, scalars: Mapping[str, float]) -> None:
        """One console line: step, the losses, tokens/s (this process, and per device), MFU when known."""
        if not self.primary:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = " ".join(f"{k}={v:.4f}" for k, v in scalars.items()
                         if k.startswith(("loss", "aia_loss")) or k in ("aia_gen", "aia_und"))
        speed = f"tokens/s={scalars.get('tokens_per_s', float('nan')):,.0f}"
        if "tokens_per_s_per_device" in scalars:
            speed += f" tokens/s/device={scalars['tokens_per_s_per_device']:,.0f}"
        if "mfu" in scalars:
            speed += f" mfu={100 * scalars['mfu']:.1f}%"
        print(f"step {step}/{self.total} {parts} {speed} elapsed={_fmt_duration(elapsed)} eta={_fmt_duration(eta)}",
              flush=True)

    def info(self, msg: str) -> None:
        if self.primary:
            print(msg, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
