"""What the TA-MoE layers of a trained model do on held-out data: `expert_stats`.

Per TA-MoE layer (in decoder order), over the non-padding tokens of the batches:

- task-router accuracy: argmax of the task router (`task_logits`) == the token's task, for MMU
  tokens, T2I tokens and all tokens (the `router_acc/layer{i}` of the `shapes_heldout` evaluator),
- the task router's mean probability of the token's own group,
- expert loads, per group and per token task: of the assignments ("slots", top_k per token, 2 x
  top_k with `soft`) that tokens of task t send into group g, the fraction each of g's N experts
  receives (sums to 1 over the group's experts; all zeros where task t sends nothing to g, as
  MMU tokens to the T2I group under `group_assignment=label`), and the share of task t's slots
  that go to each group,
- the loads of all tokens per group (what the `shapes_heldout` evaluator logs as `load/layer{i}/...`) and their
  normalised entropy H / log N (1 = uniform),
- the fraction of assignments dropped by the `capacity` dispatch, and the shared-expert `alpha`.

The per-task loads are the layer's own `load_by_task [2, 2N]` aux (`unijax.models.moe`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unijax.contract import BATCH_KEYS, MMU, T2I, TASKS
from unijax.models import forward
from unijax.models.moe import TAMoE, resolved_impl

TASK_NAMES = TASKS  # index == task id == group id


def moe_modules(model) -> list[TAMoE]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, TAMoE)]


def moe_layer_indices(cfg) -> list[int]:
    """Decoder layers that hold a TA-MoE FFN, in the order of the stacked aux."""
    if cfg.ffn != "ta_moe":
        return []
    return [i for i in range(cfg.text.num_layers) if cfg.moe.is_moe_layer(i)]


def _batch_sums(model, batch, images_per_row):
    """Per-layer sums over one batch (tokens are the non-padding ones):
    hits/prob_correct `[L, 2]` (per task), tokens `[2]`, load_by_task `[L, 2, 2N]`, load `[L, 2N]`,
    dropped `[L]`, alpha `[L]`."""
    _, _, _, aux = forward.lm_forward(model, batch, images_per_row)
    task = batch["task"]
    hits, tokens = [], []
    for t in (MMU, T2I):
        h, n = forward.router_hits(aux, dict(batch, segment_ids=jnp.where(task == t, batch["segment_ids"], 0)))
        hits.append(jnp.sum(h, axis=-1))
        tokens.append(jnp.sum(n))
    probs = jax.nn.softmax(aux["task_logits"].astype(jnp.float32), axis=-1)               # [L, B, T, 2]
    p_true = jnp.take_along_axis(probs, jnp.broadcast_to(task, probs.shape[:-1])[..., None], axis=-1)[..., 0]
    sel = (task[..., None] == jnp.arange(2)) & (batch["segment_ids"] > 0)[..., None]     # [B, T, 2]
    return {"hits": jnp.stack(hits, -1), "tokens": jnp.stack(tokens),
            "prob_correct": jnp.einsum("lbt,btg->lg", p_true, sel.astype(jnp.float32)),
            "load_by_task": aux["load_by_task"], "load": aux["load"], "dropped": aux["dropped"],
            "alpha": aux["alpha"]}


@functools.lru_cache(maxsize=8)
def _stats_fn(graphdef, images_per_row: tuple[int, int]):
    """The jitted `_batch_sums` for one model structure (cached: repeated analyses compile once)."""
    return jax.jit(lambda state, batch: _batch_sums(nnx.merge(graphdef, state), batch, images_per_row))


def _ratio(a, b):
    return float(a / b) if b > 0 else None


def _normalised(x: np.ndarray) -> list[float]:
    s = x.sum()
    return [float(v) for v in (x / s if s > 0 else np.zeros_like(x))]


def _entropy(share: list[float]) -> float | None:
    p = np.asarray(share)
    if len(p) < 2 or p.sum() <= 0:
        return None
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(len(share)))


def expert_stats(model, batches: Iterable[dict], images_per_row: tuple[int, int]) -> dict:
    """Routing statistics of `model`'s TA-MoE layers over `batches` (the batch contract of
    `unijax.data.pipeline`; extra keys such as `kind` are ignored). Returns plain python (JSON-ready):

        {"moe_layers": [decoder layer ids], "tokens": {"mmu": n, "t2i": n}, "num_experts_per_group": N,
         "top_k", "group_assignment", "impl",
         "layers": [{"layer": decoder layer id,
                     "router_acc": {"mmu", "t2i", "all"}, "router_prob": {"mmu", "t2i", "all"},
                     "expert_load": {"mmu_group": {"mmu_tokens": [N], "t2i_tokens": [N], "all_tokens": [N]},
                                     "t2i_group": {...}},
                     "group_share": {"mmu_tokens": {"mmu_group", "t2i_group"}, "t2i_tokens": {...}},
                     "load_entropy": {"mmu_group", "t2i_group"}, "dropped_frac", "alpha"}, ...]}

    Ratios with an empty denominator (a task with no tokens) are None.
    """
    cfg = model.cfg
    layers = moe_layer_indices(cfg)
    if not layers or not moe_modules(model):
        raise ValueError(f"the model has no TA-MoE layers (ffn={cfg.ffn!r}): there are no experts to analyse")
    graphdef, state = nnx.split(model)
    fn = _stats_fn(graphdef, tuple(int(n) for n in images_per_row))
    total = None
    for batch in batches:
        out = jax.device_get(fn(state, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}))
        out = {k: np.asarray(v, np.float64) for k, v in out.items()}
        if total is None:
            total = out
        else:
            total = {k: v if k == "alpha" else total[k] + v for k, v in out.items()}
    if total is None:
        raise ValueError("expert_stats got no batches")

    n = cfg.moe.num_experts_per_group
    tokens = total["tokens"]
    rows = []
    for i, layer in enumerate(layers):
        hits, prob = total["hits"][i], total["prob_correct"][i]
        lbt, load = total["load_by_task"][i], total["load"][i]                  # [2, 2N], [2N]
        expert_load, share, entropy = {}, {}, {}
        for g, gname in enumerate(TASK_NAMES):
            cell = {f"{tname}_tokens": _normalised(lbt[t, g * n:(g + 1) * n]) for t, tname in enumerate(TASK_NAMES)}
            cell["all_tokens"] = _normalised(load[g * n:(g + 1) * n])
            expert_load[f"{gname}_group"] = cell
            entropy[f"{gname}_group"] = _entropy(cell["all_tokens"]) if load[g * n:(g + 1) * n].sum() > 0 else None
        for t, tname in enumerate(TASK_NAMES):
            slots = lbt[t].sum()
            share[f"{tname}_tokens"] = {f"{g}_group": _ratio(lbt[t, k * n:(k + 1) * n].sum(), slots)
                                        for k, g in enumerate(TASK_NAMES)}
        rows.append({
            "layer": layer,
            "router_acc": {"mmu": _ratio(hits[MMU], tokens[MMU]), "t2i": _ratio(hits[T2I], tokens[T2I]),
                           "all": _ratio(hits.sum(), tokens.sum())},
            "router_prob": {"mmu": _ratio(prob[MMU], tokens[MMU]), "t2i": _ratio(prob[T2I], tokens[T2I]),
                            "all": _ratio(prob.sum(), tokens.sum())},
            "expert_load": expert_load, "group_share": share, "load_entropy": entropy,
            "dropped_frac": _ratio(total["dropped"][i], load.sum()),
            "alpha": float(total["alpha"][i]),
        })
    m = cfg.moe
    return {"moe_layers": layers, "tokens": {t: int(tokens[k]) for k, t in enumerate(TASK_NAMES)},
            "num_experts_per_group": n, "top_k": m.top_k, "group_assignment": m.group_assignment,
            "impl": resolved_impl(m), "layers": rows}


def request_routing(counts: np.ndarray, cfg, task: str) -> dict:
    """The routing of one request from its tokens' expert assignments per TA-MoE layer (`counts
    [L, 2N]`, as decoding counts them: `decode.TextStream.load`): per layer and averaged over layers,
    the share of assignments that went to each group (the task router's decision: `group_share` of
    `expert_stats`), and each group's expert loads (its `expert_load`, averaged over layers).

        {"task": "mmu" | "t2i", "tokens": tokens counted, "group_share": {"mmu_group", "t2i_group"},
         "per_layer": [{"layer", "mmu_group", "t2i_group"}, ...], "expert_load": {"mmu_group": [N], "t2i_group": [N]}}
    """
    counts = np.asarray(counts, np.float64)
    n = cfg.moe.num_experts_per_group
    groups = [f"{g}_group" for g in TASK_NAMES]
    per_layer, loads = [], {g: [] for g in groups}
    for layer, c in zip(moe_layer_indices(cfg), counts):
        total = c.sum()
        per_layer.append({"layer": layer, **{g: _ratio(c[k * n:(k + 1) * n].sum(), total) or 0.0
                                            for k, g in enumerate(groups)}})
        for k, g in enumerate(groups):
            loads[g].append(_normalised(c[k * n:(k + 1) * n]))
    top_k = cfg.moe.top_k * (2 if cfg.moe.group_assignment == "soft" else 1)  # assignments per token
    return {"task": task, "tokens": int(round(counts[0].sum() / top_k)) if len(counts) else 0,
            "group_share": {g: float(np.mean([row[g] for row in per_layer])) if per_layer else 0.0 for g in groups},
            "per_layer": per_layer,
            "expert_load": {g: np.mean(v, axis=0).round(4).tolist() if v else [] for g, v in loads.items()}}
