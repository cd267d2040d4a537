"""Per-layer cross-modal attention intensity curves of a model (the AIA paper's Figure 1 / Table 1).

`intensity_curves` runs held-out batches through the model with AIA capture on and returns, per
task, the per-sample intensities `[N, layers]` of the valid samples (`unijax.models.forward.spans`)
and their mean and standard deviation over samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from unijax import contract
from unijax.models import forward


def intensity_curves(model, batches: Sequence[dict], images_per_row: tuple[int, int], *, samples: int | None = None,
                     aia_impl: str = "lean", **span_kw) -> dict[str, dict]:
    """-> {task: {"per_sample": [N, L], "mean": [L], "std": [L], "samples": N}} (numpy float64;
    the first `samples` valid samples of each task when given)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        m = nnx.merge(graphdef, state)
        *_, aux = forward.lm_forward(m, batch, images_per_row, {"spans": span_kw, "impl": aia_impl})  # logits unused
        _, queries, valid = forward.spans(batch, m.cfg, **span_kw)
        return {t: (forward.intensities(aux["aia"], queries[t]).T, valid[t]) for t in forward.AIA_TASKS}

    rows = {t: [] for t in forward.AIA_TASKS}
    for batch in batches:
        out = jax.device_get(run(state, {k: batch[k] for k in contract.BATCH_KEYS}))
        for t, (i, v) in out.items():
            rows[t].append(np.asarray(i, np.float64)[np.asarray(v)])
    result = {}
    for t in forward.AIA_TASKS:
        per = np.concatenate(rows[t]) if rows[t] else np.zeros((0, model.cfg.text.num_layers))
        if samples is not None:
            per = per[:samples]
        result[t] = {"per_sample": per, "samples": int(per.shape[0]),
                     "mean": per.mean(0) if len(per) else np.full(per.shape[1], np.nan),
                     "std": per.std(0) if len(per) else np.full(per.shape[1], np.nan)}
    return result
