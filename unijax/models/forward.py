"""From a batch (the contract of `unijax.contract`) to the model's call, for every model family.

The train step, held-out evaluation and the analysis tools all run the model through
`lm_forward`: the model family turns the batch into inputs (`Family.prepare_inputs`: images
reassembled from their per-token pixels, the frozen VQ's codes in the image slots), then it marks the AIA
key and query spans, and returns both heads' logits with the next-token targets and the aux tree.
`lm_hidden` stops before the heads: the training loss applies them a sequence chunk at a time
(`unijax.training.losses.chunked_cross_entropy`), never holding the whole `[B, T, V]` logits.

AIA spans (paper eq. 1; docs/aia.md): for layer `l` and sample `n`, the intensity `I_l` is the
attention mass the sample's query tokens put on the other modality's keys, averaged over heads and
queries:
- T2I (`gen`): queries are the generated-image tokens, keys the prompt's text tokens (BOS
  included, the final begin-of-image token not: the official code's span; `include_bos`);
- MMU (`und`): queries are the answer tokens (`und_queries="answer"`, the official code) or every
  text token after the image (`"after_image"`), keys the understanding-image tokens.
Padding and other packed segments never count: the attention mask already keeps every query
inside its segment, so one key indicator serves both directions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unijax.contract import GEN_IMAGE, MMU, T2I, TEXT, UND_IMAGE
from unijax.models import family
from unijax.sharding import constrain

Array = jax.Array

AIA_TASKS = ("gen", "und")  # the two AIA directions: generation (T2I) and understanding (MMU)
UND_QUERIES = ("answer", "after_image")  # aia.und_queries


def prepare_inputs(model, batch: dict[str, Array], images_per_row: tuple[int, int]):
    """-> (tokens with VQ codes at image slots `[B, T]`, understanding pixels `[B, n, H, W, 3]` or None):
    the model family's rule (`Family.prepare_inputs`). A kind with 0 images per row (data without
    such images) runs no encoder: no codes, no pixels."""
    return family.of(model.cfg).prepare_inputs(model, batch, images_per_row)


def spans(batch: dict[str, Array], cfg, *, include_bos: bool = True, und_queries: str = "answer",
          skip_cfg_blank: bool = True) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """-> (keys `[B, T]` bool, queries {task: `[B, T]` bool}, valid {task: `[B]` bool}).

    A row is valid for a task when it has queries of that task and keys for them (and, for T2I
    with `skip_cfg_blank`, a prompt that was not blanked)."""
    tokens, modality, task = batch["tokens"], batch["modality"], batch["task"]
    live = batch["segment_ids"] > 0
    text = (modality == TEXT) & live
    if getattr(cfg, "eol_token_id", None) is not None:  # Emu3: end-of-line tokens belong to their image
        text &= tokens != cfg.eol_token_id
    bos = tokens == cfg.text.bos_token_id
    # T2I: the prompt = text before the image, without the begin-of-image token (and blanked pads)
    prompt = text & (task == T2I) & (tokens != cfg.boi_token_id) & (tokens != cfg.eoi_token_id) & \
        (tokens != cfg.text.pad_token_id)
    gen_keys = prompt if include_bos else prompt & ~bos
    gen_queries = (modality == GEN_IMAGE) & live
    und_keys = (modality == UND_IMAGE) & live
    if und_queries == "answer":  # token t is an answer token when the loss at t - 1 predicts it
        answer = jnp.concatenate([jnp.zeros_like(tokens[:, :1], bool), batch["text_weights"][:, :-1] > 0], axis=1)
        mmu_queries = answer & text & (task == MMU)
    elif und_queries == "after_image":  # every text token after its segment's image
        seen = jnp.cumsum(und_keys, axis=1)
        start = jnp.arange(tokens.shape[1])[None] - batch["positions"]  # the segment's first index
        before = jnp.take_along_axis(seen - und_keys, jnp.maximum(start, 0), axis=1)
        mmu_queries = text & (task == MMU) & (seen - before > 0) & ~und_keys
    else:
        raise ValueError(f"aia.und_queries={und_queries!r}: expected one of {UND_QUERIES}")
    keys = gen_keys | und_keys
    gen_valid = jnp.any(gen_queries, 1) & jnp.any(gen_keys, 1)
    if skip_cfg_blank:
        gen_valid &= jnp.any(prompt & ~bos, 1)
    und_valid = jnp.any(mmu_queries, 1) & jnp.any(und_keys, 1)
    return keys, {"gen": gen_queries, "und": mmu_queries}, {"gen": gen_valid, "und": und_valid}


def intensities(mass: Array, queries: Array) -> Array:
    """Per-query masses `[L, B, T]` (head-averaged) and a query mask `[B, T]` -> `I [L, B]`."""
    q = queries.astype(jnp.float32)
    return jnp.sum(mass * q[None], axis=-1) / jnp.maximum(jnp.sum(q, axis=-1), 1.0)[None]


TEXT_LOGITS = ("activation_batch", "activation_length", "activation_vocab")  # logical axes of `[B, T, V]`
IMAGE_LOGITS = ("activation_batch", "activation_length", None)               # and of `[B, T, K]`


def lm_hidden(model, batch: dict[str, Array], images_per_row: tuple[int, int], aia: dict | None = None):
    """`lm_forward` without the heads: -> (final hidden states `[B, T, E]`, next-token targets
    `[B, T]`, aux). The loss applies the heads chunk by chunk (`unijax.training.losses`)."""
    tokens, pixels = prepare_inputs(model, batch, images_per_row)
    keys = spans(batch, model.cfg, **aia["spans"])[0] if aia else None
    h, _, aux = model(tokens, batch["modality"], batch["positions"], batch["segment_ids"], pixels=pixels,
                      task=batch["task"], return_aux=True, capture_aia=keys,
                      aia_impl=aia["impl"] if aia else "lean")
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return h, targets, aux


def lm_forward(model, batch: dict[str, Array], images_per_row: tuple[int, int], aia: dict | None = None):
    """-> (text logits `[B, T, V]`, image logits `[B, T, K]`, next-token targets `[B, T]`, aux: the
    TA-MoE tree, plus `aia [L, B, T]` with `aia` settings (`AIASettings.as_dict`)). Under a mesh the
    logits keep their rows split over the batch axes and the text vocab over `tensor`."""
    h, targets, aux = lm_hidden(model, batch, images_per_row, aia)
    text = constrain(model.text_logits(h), TEXT_LOGITS)
    image = constrain(model.image_logits(h), IMAGE_LOGITS)
    return text, image, targets, aux


def router_hits(aux, batch: dict[str, Array]) -> tuple[Array, Array]:
    """-> (task-router hits per layer and row `[L, B]`, non-padding tokens per row `[B]`)."""
    valid = batch["segment_ids"] > 0
    hit = (jnp.argmax(aux["task_logits"], axis=-1) == batch["task"][None]) & valid[None]
    return jnp.sum(hit, axis=-1).astype(jnp.float32), jnp.sum(valid, axis=-1).astype(jnp.float32)
