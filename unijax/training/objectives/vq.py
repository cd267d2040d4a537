"""`train.objective=vq`: stage 0, the VQ tokenizer alone on the run's generated images
(`unijax.training.vq_loss`)."""

from __future__ import annotations

import jax.numpy as jnp

from unijax.models import image_inputs
from unijax.training import vq_loss
from unijax.training.objectives import Objective, register


class VQ(Objective):
    name = "vq"
    heldout = "vq"

    def functions(self, config, images_per_row, num_layers=0):
        def vq_fn(model, batch, whole=None):
            images = image_inputs.generated_images(model.cfg, batch, images_per_row[1])
            loss, metrics = vq_loss.vq_losses(model.vqmodel, images, beta=config.loss.vq_beta,
                                              entropy_weight=config.loss.vq_entropy_weight)
            metrics = dict(metrics)
            if whole is not None:  # a micro-batch: its share of the update's rows (the terms are means over images)
                share = batch["segment_ids"].shape[0] / whole["segment_ids"].shape[0]
                loss = loss * share
                metrics.update({k: v * share for k, v in metrics.items() if k.startswith("loss")})
            metrics["loss"] = loss
            metrics["tokens"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
            return loss, metrics
        return vq_fn, None


register(VQ())
