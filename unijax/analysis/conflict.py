"""Task conflict made measurable: cosines between the MMU loss's and the T2I loss's gradients.

UniDecouple's premise is that the two tasks' gradients on shared parameters have negative inner
products. `conflict_stats` sums each task's gradient over N held-out batches of that task only
(understanding batches: text cross-entropy on answer tokens; generation batches: image-code
cross-entropy), then reports, per parameter group,

    cos = <g_mmu, g_t2i> / (|g_mmu| |g_t2i|)

of the summed gradients (the direction each task pulls the shared weights in on average), the
mean and std over batches of the per-batch cosine (noisier), and both norms. A group one task does
not reach (the vision tower for T2I; under label routing a task's own TA-MoE experts) has a zero
gradient for it and no cosine (None).

Groups (`param_group`): per decoder layer `attention`, `ffn` (dense), or `shared_expert`, `experts`
and `routers` (TA-MoE), and `norms`; outside the layers `embed_tokens`, `lm_head`, `final_norm`,
`vision` (SigLIP tower + aligner) and `generation` (generation embeddings, aligner, head). Each layer
also gets `all` (every parameter of the layer), and the model `all`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable

import jax
import numpy as np
from flax import nnx

from unijax.models.lora import path_str
from unijax.training import losses

_LAYER = re.compile(r"^language_model/layers/(\d+)/(.*)$")


def param_group(path: str) -> tuple[str, str]:
    """(scope, group) of a parameter path: scope `layer<i>` or `model`."""
    m = _LAYER.match(path)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith("self_attn/"):
            g = "attention"
        elif "layernorm" in rest:
            g = "norms"
        elif rest.startswith("mlp/shared/") or rest == "mlp/alpha":
            g = "shared_expert"
        elif rest.startswith("mlp/experts/"):
            g = "experts"
        elif rest.startswith(("mlp/router/", "mlp/task_router/")):
            g = "routers"
        else:
            g = "ffn"
        return f"layer{i}", g
    top = path.split("/")[0]
    if top in ("vision_model", "aligner"):
        return "model", "vision"
    if top.startswith("generation_"):
        return "model", "generation"
    if top == "vqmodel":
        return "model", "vq"
    if path.startswith("language_model/embed_tokens"):
        return "model", "embed_tokens"
    if path.startswith("language_model/norm"):
        return "model", "final_norm"
    return "model", top


def _cos(dot: float, na: float, nb: float) -> float | None:
    return None if na == 0.0 or nb == 0.0 else float(dot / (np.sqrt(na) * np.sqrt(nb)))


def group_reductions(ga: dict, gb: dict) -> dict[tuple[str, str], tuple]:
    """{(scope, group): (<ga, gb>, |ga|^2, |gb|^2)} over flat {path: gradient} dicts, plus each
    layer's and the model's `all`; float64 sums."""
    acc: dict[tuple[str, str], np.ndarray] = {}
    for path, a in ga.items():
        a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(gb[path], np.float64).ravel()
        v = np.array([a64 @ b64, a64 @ a64, b64 @ b64])
        scope, group = param_group(path)
        for key in {(scope, group), (scope, "all"), ("model", "all")}:
            acc[key] = acc.get(key, 0.0) + v
    return {k: tuple(float(x) for x in v) for k, v in acc.items()}


def cosines(ga: dict, gb: dict) -> dict[tuple[str, str], float | None]:
    """Per-group cosine between two flat gradient dicts (see `group_reductions`)."""
    return {k: _cos(*v) for k, v in group_reductions(ga, gb).items()}


def flat(tree) -> dict[str, jax.Array]:
    """{parameter path: leaf} of a pure dict or an nnx.State (whose leaves sit under `.value`)."""
    return {path_str(p).removesuffix("/.value"): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@functools.partial(jax.jit, static_argnames=("graphdef", "images_per_row", "task"))
def _task_grad(graphdef, params, rest, batch, *, images_per_row, task: str):
    def f(p):
        _, m = losses.lm_loss(nnx.merge(graphdef, p, rest), batch, images_per_row=images_per_row)
        return m["loss_text"] if task == "mmu" else m["loss_image"]

    return jax.grad(f)(params)


def conflict_stats(model, und_batches: Iterable[dict], gen_batches: Iterable[dict],
                   images_per_row: tuple[int, int], *, grad_fn: Callable | None = None) -> dict:
    """Gradient cosines between the MMU loss (on `und_batches`) and the T2I loss (on `gen_batches`),
    paired batch by batch; see the module docstring. The VQ tokenizer is excluded (it only encodes
    targets). `grad_fn(task, batch) -> flat {path: grad}` overrides the model's gradients (tests)."""
    if grad_fn is None:
        graphdef, params, rest = nnx.split(model, _not_vq, ...)

        def grad_fn(task, batch):
            return flat(_task_grad(graphdef, params, rest, batch, images_per_row=images_per_row, task=task))

    total_a: dict | None = None
    total_b: dict | None = None
    per_batch: list[dict] = []
    n = 0
    for bu, bg in zip(und_batches, gen_batches):
        ga = {k: np.asarray(v, np.float64) for k, v in grad_fn("mmu", bu).items()}
        gb = {k: np.asarray(v, np.float64) for k, v in grad_fn("t2i", bg).items()}
        per_batch.append(cosines(ga, gb))
        total_a = ga if total_a is None else {k: total_a[k] + ga[k] for k in ga}
        total_b = gb if total_b is None else {k: total_b[k] + gb[k] for k in gb}
        n += 1
    if not n:
        raise ValueError("conflict_stats: no batches")
    summed = group_reductions(total_a, total_b)
    groups = []
    for (scope, group), (dot, na, nb) in sorted(summed.items(), key=lambda kv: _order(kv[0])):
        vals = [c[(scope, group)] for c in per_batch if c[(scope, group)] is not None]
        groups.append({"scope": scope, "group": group, "cosine": _cos(dot, na, nb),
                       "batch_cosine_mean": float(np.mean(vals)) if vals else None,
                       "batch_cosine_std": float(np.std(vals)) if vals else None,
                       "norm_mmu": float(np.sqrt(na) / n), "norm_t2i": float(np.sqrt(nb) / n)})
    return {"num_batches": n, "groups": groups}


def _not_vq(path, value) -> bool:
    return isinstance(value, nnx.Param) and (not path or path[0] != "vqmodel")


def _order(key: tuple[str, str]):
    scope, group = key
    layer = int(scope[5:]) if scope.startswith("layer") else -1
    return (scope == "model" and group == "all", layer, group == "all", group)
