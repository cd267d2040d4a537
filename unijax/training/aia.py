"""Attention Interaction Alignment (AIA): cross-modal attention intensity and its Huber loss.

For layer `l` and sample `n`, the intensity `I_l` is the attention mass the sample's query tokens
put on the other modality's keys, averaged over heads and queries (paper eq. 1):
- T2I: queries are the generated-image tokens, keys the prompt's text tokens (BOS included,
  the final begin-of-image token not: the official code's span; `aia.include_bos`);
- MMU: queries are the answer tokens (`aia.und_queries="answer"`, the official code) or every
  text token after the image (`"after_image"`), keys the understanding-image tokens.
Padding and other packed segments never count: the attention mask already keeps every query
inside its segment, so one key indicator serves both directions. With packing, a row's
intensity averages the queries of all its samples of that task.

`L_AIA,task = mean over layers l and valid samples n of Huber_{delta_l}(I_l,n - T_l)` (paper
eq. 2; `optax.huber_loss`), targets `T_l` and thresholds `delta_l` from a layer-range table
(`TABLES`: the paper's Janus-Pro / Emu3 tables and the official code's bands, rescaled to other
depths by relative layer position) or a per-layer curve file (`python -m unijax.analyze
intensity`). The training loss adds `aia_gen_weight * L_AIA,gen + aia_und_weight * L_AIA,und`.
T2I samples whose prompt was blanked for classifier-free guidance get no AIA loss by default
(`aia.skip_cfg_blank`).
"""

from __future__ import annotations

import json
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unijax.models.config import AIA_IMPLS
from unijax.models.forward import AIA_TASKS, UND_QUERIES, intensities, spans

Array = jax.Array

# (first layer, end layer (exclusive), delta, target) at the table's reference depth
TABLES = {
    # Table S5 (Janus-Pro, 30 layers) and Table S4 (Emu3, 32 layers) of the paper
    "janus_pro": {"layers": 30,
                  "gen": [(0, 10, 0.2, 0.4), (10, 20, 0.1, 0.4), (20, 25, 0.1, 0.4), (25, 30, 0.05, 0.2)],
                  "und": [(0, 10, 0.05, 0.1), (10, 20, 0.05, 0.15), (20, 25, 0.05, 0.3), (25, 30, 0.05, 0.3)]},
    "emu3": {"layers": 32,
             "gen": [(0, 10, 0.2, 0.4), (10, 20, 0.1, 0.4), (20, 25, 0.1, 0.4), (25, 31, 0.05, 0.2),
                     (31, 32, 0.05, 0.2)],
             "und": [(0, 10, 0.05, 0.1), (10, 20, 0.05, 0.15), (20, 25, 0.05, 0.3), (25, 31, 0.05, 0.3),
                     (31, 32, 0.05, 0.2)]},
    # the official code's hard-coded bands (zhengdian1/AIA, Janus-Pro)
    "official": {"layers": 30,
                 "gen": [(0, 10, 0.2, 0.4), (10, 25, 0.1, 0.4), (25, 30, 0.05, 0.2)],
                 "und": [(0, 10, 0.05, 0.1), (10, 21, 0.05, 0.15), (21, 30, 0.05, 0.3)]},
}


def settings(config, num_layers: int) -> dict | None:
    """The `lm_loss(aia=...)` settings from `loss.aia_*` and `aia.*`; None when AIA is off."""
    lo = config.loss
    weights = {"gen": lo.aia_gen_weight if lo.aia_gen_weight is not None else lo.aia_weight,
               "und": lo.aia_und_weight if lo.aia_und_weight is not None else lo.aia_weight}
    if not any(float(w) > 0 for w in weights.values()):
        return None
    a = config.aia
    if a.impl not in AIA_IMPLS:
        raise ValueError(f"aia.impl={a.impl!r}: expected one of {AIA_IMPLS}")
    if a.und_queries not in UND_QUERIES:
        raise ValueError(f"aia.und_queries={a.und_queries!r}: expected one of {UND_QUERIES}")
    targets = {}
    for task in AIA_TASKS:
        try:
            targets[task] = layer_targets(a[f"{task}_targets"], task, num_layers, a.curve_delta)
        except ValueError as e:
            raise ValueError(f"aia.{task}_targets: {e}") from None
    return {"targets": targets, "weights": {t: float(w) for t, w in weights.items()}, "impl": a.impl,
            "spans": {"include_bos": bool(a.include_bos), "und_queries": a.und_queries,
                      "skip_cfg_blank": bool(a.skip_cfg_blank)}}


class Targets(NamedTuple):
    target: np.ndarray  # [layers]
    delta: np.ndarray   # [layers]


def _from_table(name: str, task: str, num_layers: int) -> Targets:
    table = TABLES[name]
    ref = table["layers"]
    target, delta = np.zeros(num_layers), np.zeros(num_layers)
    for l in range(num_layers):
        r = min(int((l + 0.5) * ref / num_layers), ref - 1)  # relative position -> reference layer
        for lo, hi, d, t in table[task]:
            if lo <= r < hi:
                target[l], delta[l] = t, d
    return Targets(target, delta)


def load_curve(path: str | pathlib.Path, task: str, num_layers: int, delta: float) -> Targets:
    """A curve file (`analyze intensity --out`): `{"task", "mean": [L], "std": [L], ...}`, or
    `{"gen": {...}, "und": {...}}`; optional `"delta": [L]`, else the config's `aia.curve_delta`."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"AIA target file {path}: {e}") from None
    if task in data:
        data = data[task]
    elif data.get("task") not in (task, None):
        raise ValueError(f"AIA target file {path} holds the {data.get('task')!r} curve, not {task!r}")
    if "mean" not in data:
        raise ValueError(f"AIA target file {path}: no 'mean' curve for task {task!r}")
    mean = np.asarray(data["mean"], np.float64)
    if mean.shape != (num_layers,):
        raise ValueError(f"AIA target file {path}: {mean.shape[0] if mean.ndim else 0} layers, the model has "
                         f"{num_layers}")
    d = np.asarray(data.get("delta", [delta] * num_layers), np.float64)
    return Targets(mean, d)


def layer_targets(spec: str, task: str, num_layers: int, curve_delta: float = 0.05) -> Targets:
    """`spec`: a `TABLES` name or a curve file path -> per-layer targets and Huber thresholds."""
    if task not in AIA_TASKS:
        raise ValueError(f"AIA task {task!r}: expected one of {AIA_TASKS}")
    if spec in TABLES:
        return _from_table(spec, task, num_layers)
    if not pathlib.Path(spec).is_file():
        raise ValueError(f"AIA targets {spec!r}: neither a table ({', '.join(TABLES)}) nor an existing curve file")
    return load_curve(spec, task, num_layers, curve_delta)


def huber_loss(intensity: Array, valid: Array, targets: Targets) -> Array:
    """mean over layers and valid samples of Huber_{delta_l}(I_l - T_l); 0 with no valid sample."""
    t = jnp.asarray(targets.target, jnp.float32)[:, None]
    d = jnp.asarray(targets.delta, jnp.float32)[:, None]
    # optax.huber_loss: 0.5 x^2 for |x| <= delta, delta * (|x| - 0.5 delta) beyond: eq. 2
    h = optax.huber_loss(intensity, jnp.broadcast_to(t, intensity.shape), delta=d)
    w = valid.astype(jnp.float32)[None]
    return jnp.sum(h * w) / jnp.maximum(jnp.sum(w) * intensity.shape[0], 1.0)


def aia_terms(mass: Array, batch: dict[str, Array], cfg, targets: dict[str, Targets], **span_kw) -> dict[str, Array]:
    """Per task: `aia_loss_<task>`, the mean intensity `aia_<task>` over valid samples and layers,
    the per-layer curve as scalars `aia_curve_<task>/<layer>` (TensorBoard groups them) and the
    valid-sample count `aia_samples_<task>`."""
    _, queries, valid = spans(batch, cfg, **span_kw)
    out = {}
    for task in AIA_TASKS:
        i = intensities(mass, queries[task])
        w = valid[task].astype(jnp.float32)
        n = jnp.sum(w)
        curve = jnp.sum(i * w[None], axis=1) / jnp.maximum(n, 1.0)
        out.update({f"aia_loss_{task}": huber_loss(i, valid[task], targets[task]), f"aia_{task}": jnp.mean(curve),
                    f"aia_samples_{task}": n})
        out.update({f"aia_curve_{task}/{l:02d}": curve[l] for l in range(curve.shape[0])})
    return out
