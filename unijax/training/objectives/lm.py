"""`train.objective=lm`: next-token cross-entropy on both tasks, with the TA-MoE router losses and
the AIA loss when configured (`unijax.training.losses`)."""

from __future__ import annotations

import functools

from unijax.training import aia, losses
from unijax.training.objectives import Objective, register


class LM(Objective):
    name = "lm"
    heldout = "lm"

    def functions(self, config, images_per_row, num_layers=0):
        loss = config.loss
        loss_fn = functools.partial(losses.lm_loss, images_per_row=images_per_row, text_weight=loss.text_weight,
                                    image_weight=loss.image_weight, group_weight=loss.group_weight,
                                    balance_weight=loss.balance_weight, z_weight=loss.z_weight,
                                    aia=aia.settings(config, num_layers), chunk_size=loss.chunk_size)
        return loss_fn, functools.partial(losses.lm_eval, images_per_row=images_per_row, chunk_size=loss.chunk_size)


register(LM())
