"""Images inside a batch of the contract (`unijax.contract`): whole images reassembled from their
per-token pixel patches, and the frozen VQ's codes written into image slots. Model families use
these to turn a batch into their inputs (`unijax.models.family.Family.prepare_inputs`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unijax.contract import GEN_IMAGE, UND_IMAGE
from unijax.models.layers import fill_in_order

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


def fill_codes(model, batch: dict[str, Array], tokens: Array, kind: int, num_images: int) -> Array:
    """`tokens` with the frozen VQ's codes of the images under `kind` slots filled in, in order (no
    images per row: `tokens` as they are, the VQ not run)."""
    if not num_images:
        return tokens
    codes = model.vqmodel.encode(generated_images(model.cfg, batch, num_images, kind)).reshape(tokens.shape[0], -1)
    return fill_in_order(batch["modality"] == kind, jax.lax.stop_gradient(codes), tokens)
