"""Per-task losses on a mixed batch (the batch contract of `unijax.data.pipeline`).

    L = lambda_text * CE_text + lambda_image * CE_image

`CE_text` is the mean cross-entropy of the text head over positions whose next token is an answer
token (understanding); `CE_image` the mean cross-entropy of the image head over positions whose
next token is a generated-image code (generation). Both are token means over the global batch.
Generated-image codes are not in the batch: the frozen VQ tokenizer encodes the pixels carried at
`GEN_IMAGE` positions inside the step, and the codes fill those token slots.

A TA-MoE model (`model.ffn = "ta_moe"`) adds its router losses (`moe_losses`):

    L += gamma * L_group + beta * L_balance + zeta * L_z

`L_group` is the task router's cross-entropy against each token's task, `L_balance` the Switch
load-balancing loss inside each expert group and `L_z` the router z-loss, each averaged over the
non-padding tokens and the TA-MoE layers.

With AIA on (`loss.aia_weight > 0`; `unijax.training.aia`), the attention layers also measure the
cross-modal intensities and

    L += lambda_gen * L_AIA,gen + lambda_und * L_AIA,und

Vocabulary tiling (`loss.chunk_size`, MaxText's "vocab tiling"), heads only at loss positions: each
head gathers the positions where its loss is taken to the front of each batch shard's rows and is
applied to them a chunk at a time (`chunked_cross_entropy`), each chunk's logits in the model's
compute dtype and their logsumexp in float32, under `jax.checkpoint` so that the backward pass
recomputes a chunk's logits instead of keeping them; chunks past the last loss position skip the
head. Neither pass then holds the float32 `[B, T, V]` text or `[B, T, K]` image logits, the largest
buffers of the step at Janus-Pro sizes, and the text head (102,400 words) runs on answer tokens
only. `chunk_size=0` computes the whole logits at once (the reference the chunked path is tested
against).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from unijax.models.forward import AIA_TASKS, IMAGE_LOGITS, TEXT_LOGITS, lm_forward, lm_hidden, router_hits, spans
from unijax.models.janus import Janus
from unijax.sharding import BATCH_AXES, RESIDUAL, constrain
from unijax.training import aia as aia_lib

Array = jax.Array


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Per-position cross-entropy `[...]` in float32."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def chunked_logit_stats(h: Array, head_fn: Callable[[Array], Array], targets: Array, chunk: int,
                        axes: Sequence[str | None] = TEXT_LOGITS, argmax: bool = False):
    """Per-position cross-entropy `[B, T]` (float32) of the logits `head_fn(h)` against `targets`,
    plus their argmax `[B, T]` with `argmax`, computed `chunk` positions at a time.

    `h [B, T, E]` is padded to a multiple of `chunk` positions and scanned over; each step applies
    `head_fn` to `[B, chunk, E]` (logits in the head's compute dtype, pinned to `axes` under a mesh),
    takes the logsumexp in float32 and the target's logit by `take_along_axis`. The step is
    checkpointed: its residuals are its inputs, and the backward pass recomputes its logits."""
    b, t = targets.shape
    chunk = max(1, min(int(chunk), t))
    n = -(-t // chunk)

    def piece(hc, tc):
        logits = constrain(head_fn(constrain(hc, RESIDUAL)), axes)
        ce = cross_entropy(logits, tc)
        return (ce, jnp.argmax(logits, axis=-1)) if argmax else ce

    if n == 1:  # one chunk: no scan, but still no logits kept for the backward pass
        return jax.checkpoint(piece)(h, targets)
    if n * chunk > t:
        h = jnp.pad(h, ((0, 0), (0, n * chunk - t), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, n * chunk - t)))

    def split(x):  # [B, n * chunk, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    step = jax.checkpoint(piece, prevent_cse=False)  # inside a scan: no CSE to prevent
    _, ys = jax.lax.scan(lambda carry, xs: (carry, step(*xs)), None, (split(h), split(targets)))
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(b, n * chunk)[:, :t], ys)


def batch_groups(rows: int) -> int:
    """The groups a batch's rows split into so that each group lies on one batch shard of the context
    mesh (`data` x `fsdp` x `expert`; 1 without a mesh): work done per group stays on its device."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
    return math.gcd(int(rows), shards)


def chunked_cross_entropy(h: Array, head_fn: Callable[[Array], Array], targets: Array, weights: Array, chunk: int,
                          axes: Sequence[str | None] = TEXT_LOGITS) -> tuple[Array, Array]:
    """-> (sum over positions of `weights` x the cross-entropy of `head_fn(h)` against `targets`,
    in float32; sum of `weights`), with the head applied only where a loss is taken.

    The rows split into `batch_groups` (one per batch shard); within each group the positions of
    nonzero weight are gathered to the front (a stable sort of its `rows x T` positions, on the
    device that holds them), and the gathered positions are scanned `rows x chunk` at a time (the
    chunk's logits are as large as `chunked_logit_stats`'s `[B, chunk, V]`). A chunk in which no
    group has a loss position skips the head under `lax.cond`, forwards and backwards, so the head
    runs on `ceil(max loss positions of a group / (rows x chunk))` chunks. Each chunk is
    checkpointed like `chunked_logit_stats`'s: no logits are kept for the backward pass."""
    b, t = targets.shape
    g = batch_groups(b)
    n = b // g * t
    chunk = b // g * max(1, min(int(chunk), t))  # a chunk holds as many positions as `chunk` columns of the rows
    steps = -(-n // chunk)
    h, targets, weights = h.reshape(g, n, h.shape[-1]), targets.reshape(g, n), weights.reshape(g, n)
    order = jnp.argsort(weights == 0, axis=1, stable=True)  # loss positions first, in their order
    h = constrain(jnp.take_along_axis(h, order[..., None], axis=1), RESIDUAL)
    targets, w = jnp.take_along_axis(targets, order, axis=1), jnp.take_along_axis(weights, order, axis=1)
    if steps * chunk > n:
        h = jnp.pad(h, ((0, 0), (0, steps * chunk - n), (0, 0)))
        targets, w = (jnp.pad(x, ((0, 0), (0, steps * chunk - n))) for x in (targets, w))

    def head_ce(hc, tc, wc):
        logits = constrain(head_fn(constrain(hc, RESIDUAL)), axes)
        return jnp.sum(cross_entropy(logits, tc) * wc)

    taken = jax.checkpoint(head_ce, prevent_cse=False)  # inside a scan: no CSE to prevent

    def step(hc, tc, wc):  # the checkpoint inside the branch: recompute and backward share one branch
        return jax.lax.cond(jnp.any(wc != 0), taken, lambda *_: jnp.zeros((), jnp.float32), hc, tc, wc)

    def split(x):  # [G, steps * chunk, ...] -> [steps, G, chunk, ...]
        return jnp.moveaxis(x.reshape(g, steps, chunk, *x.shape[2:]), 1, 0)

    total, _ = jax.lax.scan(lambda acc, xs: (acc + step(*xs), None), jnp.zeros((), jnp.float32),
                            (split(h), split(targets), split(w)))
    return total, jnp.sum(weights)


def moe_losses(aux, batch: dict[str, Array], *, top_k: int, total: Array | None = None) -> dict[str, Array]:
    """The TA-MoE router losses and statistics from the layer-stacked aux tree (module docstring).
    `total`: the update's valid tokens when `batch` is one micro-batch of it (see `lm_loss`)."""
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    local = jnp.sum(valid)
    n = jnp.maximum(local if total is None else total, 1.0)
    share = local / n  # batch statistics (balance, z) are weighted by the micro-batch's share of tokens
    ce = cross_entropy(aux["task_logits"], jnp.broadcast_to(batch["task"], aux["task_logits"].shape[:-1]))
    hits, _ = router_hits(aux, batch)
    layers = aux["balance"].shape[0]
    return {"loss_group": jnp.mean(jnp.sum(ce * valid[None], axis=(1, 2)) / n),
            "loss_balance": jnp.mean(aux["balance"]) * share, "loss_z": jnp.mean(aux["z"]) * share,
            "router_acc": jnp.sum(hits) / (n * layers),
            "dropped_frac": jnp.sum(aux["dropped"]) / (n * top_k * layers), "alpha": jnp.mean(aux["alpha"])}


def _masked_mean(x: Array, w: Array, total: Array | None = None) -> tuple[Array, Array]:
    local = jnp.sum(w)
    return jnp.sum(x * w) / jnp.maximum(local if total is None else total, 1.0), local


def totals(batch: dict[str, Array]) -> dict[str, Array]:
    """The denominators of `lm_loss`'s token means over a whole update's batch: answer tokens,
    image-code tokens, valid tokens."""
    return {"text_tokens": jnp.sum(batch["text_weights"]), "image_tokens": jnp.sum(batch["image_weights"]),
            "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}


# metrics of a micro-batch that add up to the update's value (the rest are averaged over micro-batches)
def additive(key: str) -> bool:
    return key.startswith(("loss", "aia_loss", "aia_samples")) or key in (
        "text_tokens", "image_tokens", "tokens", "router_acc", "dropped_frac")


def lm_loss(model: Janus, batch: dict[str, Array], *, images_per_row: tuple[int, int], text_weight: float = 1.0,
            image_weight: float = 1.0, group_weight: float = 0.0, balance_weight: float = 0.0,
            z_weight: float = 0.0, aia: dict | None = None, whole: dict[str, Array] | None = None,
            chunk_size: int = 512):
    """Returns (loss, metrics) for a mixed understanding + generation batch (module docstring).
    `aia`: None (off) or {"targets": {task: Targets}, "weights": {task: lambda}, "spans": span
    options, "impl": "lean" | "explicit"}.

    `whole`: the update's batch when `batch` is one micro-batch of it (gradient accumulation). Every
    mean then divides by the whole batch's count, so the micro-batches' losses (and gradients) add
    up to the whole batch's: exactly for the cross-entropies, the task-router loss, the router
    z-loss and accuracy and the AIA terms (means over valid samples); the Switch balance loss, a
    product of two batch means, is taken per micro-batch and weighted by its share of the tokens
    (as MaxText and Megatron do).

    `chunk_size`: positions per chunk of the heads' cross-entropies (`chunked_cross_entropy`); 0 =
    the whole `[B, T, V]` and `[B, T, K]` logits at once."""
    k = model.cfg.vq.num_embeddings
    counts = {} if whole is None else totals(whole)
    tw, iw = batch["text_weights"], batch["image_weights"]
    if chunk_size:
        h, targets, aux = lm_hidden(model, batch, images_per_row, aia)
        text_sum, n_text = chunked_cross_entropy(h, model.text_logits, targets, tw, chunk_size, TEXT_LOGITS)
        image_sum, n_image = chunked_cross_entropy(h, model.image_logits, jnp.clip(targets, 0, k - 1), iw, chunk_size,
                                                   IMAGE_LOGITS)
        ce_text = text_sum / jnp.maximum(counts.get("text_tokens", n_text), 1.0)
        ce_image = image_sum / jnp.maximum(counts.get("image_tokens", n_image), 1.0)
    else:
        text_logits, image_logits, targets, aux = lm_forward(model, batch, images_per_row, aia)
        ce_text, n_text = _masked_mean(cross_entropy(text_logits, targets), tw, counts.get("text_tokens"))
        ce_image, n_image = _masked_mean(cross_entropy(image_logits, jnp.clip(targets, 0, k - 1)), iw,
                                         counts.get("image_tokens"))
    loss = text_weight * ce_text + image_weight * ce_image
    tokens = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
    metrics = {"loss_text": ce_text, "loss_image": ce_image, "text_tokens": n_text, "image_tokens": n_image,
               "tokens": tokens}
    if "task_logits" in aux:
        m = moe_losses(aux, batch, top_k=model.cfg.moe.top_k, total=counts.get("tokens"))
        loss = loss + group_weight * m["loss_group"] + balance_weight * m["loss_balance"] + z_weight * m["loss_z"]
        metrics.update(m)
    if aia:
        m = aia_lib.aia_terms(aux["aia"], batch, model.cfg, aia["targets"], **aia["spans"])
        if whole is not None:  # each task's Huber mean over the whole batch's valid samples
            _, _, valid = spans(whole, model.cfg, **aia["spans"])
            m.update({f"aia_loss_{t}": m[f"aia_loss_{t}"] * m[f"aia_samples_{t}"] /
                      jnp.maximum(jnp.sum(valid[t]), 1.0) for t in AIA_TASKS})
        loss = loss + sum(aia["weights"][t] * m[f"aia_loss_{t}"] for t in AIA_TASKS)
        metrics.update(m)
    metrics["loss"] = loss
    return loss, metrics


def lm_eval(model: Janus, batch: dict[str, Array], *, images_per_row: tuple[int, int], chunk_size: int = 512):
    """Held-out metrics per row: exact-match answers under teacher forcing, the predicted first answer
    token, image-code CE sums.

    A row's answer is correct iff the argmax at every answer position is the target: exactly the
    condition for greedy decoding to reproduce the answer (and its eos), at a single forward pass.
    `chunk_size`: as `lm_loss`'s (the per-position CE and argmax a chunk of positions at a time).
    """
    k = model.cfg.vq.num_embeddings
    tw, iw = batch["text_weights"], batch["image_weights"]
    if chunk_size:
        h, targets, aux = lm_hidden(model, batch, images_per_row)
        text_ce, pred = chunked_logit_stats(h, model.text_logits, targets, chunk_size, TEXT_LOGITS, argmax=True)
        image_ce = chunked_logit_stats(h, model.image_logits, jnp.clip(targets, 0, k - 1), chunk_size, IMAGE_LOGITS)
    else:
        text_logits, image_logits, targets, aux = lm_forward(model, batch, images_per_row)
        pred = jnp.argmax(text_logits, axis=-1)
        text_ce, image_ce = cross_entropy(text_logits, targets), cross_entropy(image_logits, jnp.clip(targets, 0, k - 1))
    hit = (pred == targets) | (tw == 0)
    out = {}
    if "task_logits" in aux:  # TA-MoE: task-router hits per row and layer, expert loads of the batch (a leading axis of 1)
        hits, tokens = router_hits(aux, batch)
        out = {"router_hits": hits.T, "router_tokens": tokens, "expert_load": aux["load"][None]}
    first = jnp.argmax(tw > 0, axis=1)[:, None]  # the position predicting each row's first answer token
    out["first_answer"] = jnp.take_along_axis(pred, first, axis=1)[:, 0]
    return out | {"answered": jnp.any(tw > 0, axis=1), "correct": jnp.all(hit, axis=1) & jnp.any(tw > 0, axis=1),
            "text_ce_sum": jnp.sum(text_ce * tw, axis=1), "text_tokens": jnp.sum(tw, 1),
            "image_ce_sum": jnp.sum(image_ce * iw, axis=1),
            "image_tokens": jnp.sum(iw, axis=1)}
