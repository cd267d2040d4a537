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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unijax.models.janus import GEN_IMAGE, UND_IMAGE, Janus
from unijax.models.layers import fill_in_order
from unijax.training import aia as aia_lib

Array = jax.Array


def gather_images(patches: Array, mask: Array, num_images: int, patch: int, grid: int) -> Array:
    """Reassembles whole images from per-token pixel patches.

    patches `[B, T, P]` uint8, mask `[B, T]` (the image tokens of one kind, `grid^2` per image, in
    order) -> float images `[B, num_images, grid*patch, grid*patch, 3]` in [-1, 1]. Slots beyond a
    row's images hold garbage that nothing reads.
    """
    b, t, _ = patches.shape
    n = num_images * grid * grid
    order = jnp.argsort(~mask, axis=1, stable=True)                     # image tokens first, in order
    if n > t:
        order = jnp.pad(order, ((0, 0), (0, n - t)))
    idx = order[:, :n]
    p = jnp.take_along_axis(patches, idx[..., None], axis=1)[..., : patch * patch * 3]
    p = p.reshape(b, num_images, grid, grid, patch, patch, 3).transpose(0, 1, 2, 4, 3, 5, 6)
    img = p.reshape(b, num_images, grid * patch, grid * patch, 3)
    return img.astype(jnp.float32) / 127.5 - 1.0


def understanding_images(cfg, batch: dict[str, Array], num_images: int) -> Array:
    """The images under `UND_IMAGE` tokens: `[B, num_images, H, W, 3]` in [-1, 1]."""
    return gather_images(batch["patches"], batch["modality"] == UND_IMAGE, num_images, cfg.vision.patch_size,
                         cfg.vision.image_size // cfg.vision.patch_size)


def generated_images(cfg, batch: dict[str, Array], num_images: int, kind: int = GEN_IMAGE) -> Array:
    """The images under `kind` tokens laid out in VQ blocks (`GEN_IMAGE`; for Emu3 also `UND_IMAGE`),
    flattened: `[B * num_images, H, W, 3]` in [-1, 1]."""
    imgs = gather_images(batch["patches"], batch["modality"] == kind, num_images,
                         cfg.vq.image_size // cfg.vq.grid, cfg.vq.grid)
    return imgs.reshape(-1, *imgs.shape[2:])


def _fill_codes(model, batch: dict[str, Array], tokens: Array, kind: int, num_images: int) -> Array:
    """`tokens` with the frozen VQ's codes of the images under `kind` slots filled in, in order."""
    codes = model.vqmodel.encode(generated_images(model.cfg, batch, num_images, kind)).reshape(tokens.shape[0], -1)
    return fill_in_order(batch["modality"] == kind, jax.lax.stop_gradient(codes), tokens)


def prepare_inputs(model: Janus, batch: dict[str, Array], images_per_row: tuple[int, int]):
    """-> (tokens with VQ codes at generated-image slots `[B, T]`, understanding pixels `[B, n, H, W, 3]`).

    Emu3 (one tokenizer both ways): understanding slots get VQ codes too, and there are no pixels."""
    cfg = model.cfg
    n_und, n_gen = images_per_row
    tokens = _fill_codes(model, batch, batch["tokens"], GEN_IMAGE, n_gen)
    if getattr(cfg, "family", "janus") == "emu3":
        return _fill_codes(model, batch, tokens, UND_IMAGE, n_und), None
    return tokens, understanding_images(cfg, batch, n_und).astype(cfg.dtype)


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Per-position cross-entropy `[...]` in float32."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def lm_forward(model: Janus, batch: dict[str, Array], images_per_row: tuple[int, int], aia: dict | None = None):
    """-> (text logits `[B, T, V]`, image logits `[B, T, K]`, next-token targets `[B, T]`, aux: the
    TA-MoE tree, plus `aia [L, B, T]` with `aia` settings (`AIASettings.as_dict`))."""
    tokens, pixels = prepare_inputs(model, batch, images_per_row)
    keys = aia_lib.spans(batch, model.cfg, **aia["spans"])[0] if aia else None
    h, _, aux = model(tokens, batch["modality"], batch["positions"], batch["segment_ids"], pixels=pixels,
                      task=batch["task"], return_aux=True, capture_aia=keys,
                      aia_impl=aia["impl"] if aia else "lean")
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return model.text_logits(h), model.image_logits(h), targets, aux


def router_hits(aux, batch: dict[str, Array]) -> tuple[Array, Array]:
    """-> (task-router hits per layer and row `[L, B]`, non-padding tokens per row `[B]`)."""
    valid = batch["segment_ids"] > 0
    hit = (jnp.argmax(aux["task_logits"], axis=-1) == batch["task"][None]) & valid[None]
    return jnp.sum(hit, axis=-1).astype(jnp.float32), jnp.sum(valid, axis=-1).astype(jnp.float32)


def moe_losses(aux, batch: dict[str, Array], *, top_k: int) -> dict[str, Array]:
    """The TA-MoE router losses and statistics from the layer-stacked aux tree (module docstring)."""
    valid = (batch["segment_ids"] > 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    ce = cross_entropy(aux["task_logits"], jnp.broadcast_to(batch["task"], aux["task_logits"].shape[:-1]))
    hits, _ = router_hits(aux, batch)
    layers = aux["balance"].shape[0]
    return {"loss_group": jnp.mean(jnp.sum(ce * valid[None], axis=(1, 2)) / n),
            "loss_balance": jnp.mean(aux["balance"]), "loss_z": jnp.mean(aux["z"]),
            "router_acc": jnp.sum(hits) / (n * layers),
            "dropped_frac": jnp.sum(aux["dropped"]) / (n * top_k * layers), "alpha": jnp.mean(aux["alpha"])}


def _masked_mean(x: Array, w: Array) -> tuple[Array, Array]:
    total = jnp.sum(w)
    return jnp.sum(x * w) / jnp.maximum(total, 1.0), total


def lm_loss(model: Janus, batch: dict[str, Array], *, images_per_row: tuple[int, int], text_weight: float = 1.0,
            image_weight: float = 1.0, group_weight: float = 0.0, balance_weight: float = 0.0,
            z_weight: float = 0.0, aia: dict | None = None):
    """Returns (loss, metrics) for a mixed understanding + generation batch (module docstring).
    `aia`: None (off) or {"targets": {task: Targets}, "weights": {task: lambda}, "spans": span
    options, "impl": "lean" | "explicit"}."""
    text_logits, image_logits, targets, aux = lm_forward(model, batch, images_per_row, aia)
    k = model.cfg.vq.num_embeddings
    ce_text, n_text = _masked_mean(cross_entropy(text_logits, targets), batch["text_weights"])
    ce_image, n_image = _masked_mean(cross_entropy(image_logits, jnp.clip(targets, 0, k - 1)),
                                     batch["image_weights"])
    loss = text_weight * ce_text + image_weight * ce_image
    metrics = {"loss_text": ce_text, "loss_image": ce_image, "text_tokens": n_text,
               "image_tokens": n_image, "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}
    if "task_logits" in aux:
        m = moe_losses(aux, batch, top_k=model.cfg.moe.top_k)
        loss = loss + group_weight * m["loss_group"] + balance_weight * m["loss_balance"] + z_weight * m["loss_z"]
        metrics.update(m)
    if aia:
        m = aia_lib.aia_terms(aux["aia"], batch, model.cfg, aia["targets"], **aia["spans"])
        loss = loss + sum(aia["weights"][t] * m[f"aia_loss_{t}"] for t in aia_lib.TASKS)
        metrics.update(m)
    metrics["loss"] = loss
    return loss, metrics


def lm_eval(model: Janus, batch: dict[str, Array], *, images_per_row: tuple[int, int]):
    """Held-out metrics per row: exact-match answers under teacher forcing, the predicted first answer
    token, image-code CE sums.

    A row's answer is correct iff the argmax at every answer position is the target: exactly the
    condition for greedy decoding to reproduce the answer (and its eos), at a single forward pass.
    """
    text_logits, image_logits, targets, aux = lm_forward(model, batch, images_per_row)
    k = model.cfg.vq.num_embeddings
    tw, iw = batch["text_weights"], batch["image_weights"]
    pred = jnp.argmax(text_logits, axis=-1)
    hit = (pred == targets) | (tw == 0)
    out = {}
    if "task_logits" in aux:  # TA-MoE: task-router hits per row and layer, expert loads of the batch (a leading axis of 1)
        hits, tokens = router_hits(aux, batch)
        out = {"router_hits": hits.T, "router_tokens": tokens, "expert_load": aux["load"][None]}
    first = jnp.argmax(tw > 0, axis=1)[:, None]  # the position predicting each row's first answer token
    out["first_answer"] = jnp.take_along_axis(pred, first, axis=1)[:, 0]
    return out | {"answered": jnp.any(tw > 0, axis=1), "correct": jnp.all(hit, axis=1) & jnp.any(tw > 0, axis=1),
            "text_ce_sum": jnp.sum(cross_entropy(text_logits, targets) * tw, axis=1), "text_tokens": jnp.sum(tw, 1),
            "image_ce_sum": jnp.sum(cross_entropy(image_logits, jnp.clip(targets, 0, k - 1)) * iw, axis=1),
            "image_tokens": jnp.sum(iw, axis=1)}
