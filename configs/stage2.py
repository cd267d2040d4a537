"""Stage 2 of UniDecouple: joint fine-tuning of the upcycled TA-MoE model with LoRA.

Every decoder FFN is a TA-MoE layer (MMU group, T2I group, shared expert); the upcycled weights
(attention, experts, shared expert, everything else) are frozen and adapted by LoRA rank 16 on
the attention projections and every expert / shared-expert matrix; the task router, the in-group
router and `alpha` train fully. Both tasks 1:1, `L = sum_t lambda_t L_t + gamma L_group` (+ the
balance and z losses).

    python -m unijax.train --config configs/stage2.py        # a fresh tiny TA-MoE model (no init_from)

The recipe, from a base checkpoint:

    python -m unijax.train --config configs/stage1_und.py --config.init_from=workdir/base/model
    python -m unijax.train --config configs/stage1_gen.py --config.init_from=workdir/base/model
    python -m unijax.upcycle --base workdir/base/model --und workdir/stage1_und/model \\
        --gen workdir/stage1_gen/model --out workdir/upcycled --noise 0.01
    python -m unijax.train --config configs/stage2.py --config.init_from=workdir/upcycled

`configs/stage2.py:aia` (the `+aia` variant) adds the AIA loss with the official weights.
"""

from configs import base

# stage 2 trains the routers and alpha fully; everything else is frozen and LoRA-adapted
TRAINABLE = (r"language_model/layers/(.*/)?mlp/(task_router|router)/.*", r"language_model/layers/(.*/)?mlp/alpha")


def get_config(arg=None):
    variant = None
    if arg and arg.endswith("aia"):
        arg, variant = (arg[: -len("aia")].rstrip("+,") or None), "aia"
    c = base.get_config(arg)
    c.workdir = "workdir/stage2" + ("_aia" if variant else "")
    c.model.ffn = "ta_moe"
    # without init_from: stage 0, the base, stage 1 on each task and upcycling are built first, each cached in
    # <workdir>/prerequisites/ (a rerun reuses them); the run then starts from the upcycled model
    c.init_recipe = "upcycled"
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.train.trainable = TRAINABLE
    c.train.frozen = ()                # the rest is frozen and LoRA-adapted (model.lora.targets)
    c.vision_pretrain.steps = 0        # the vision tower is frozen here (and comes from init_from in the recipe)
    c.train.steps = 200
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 20
    c.train.checkpoint_every = 100
    c.train.eval_every = 100
    c.train.eval_at_start = True       # the run ends with held-out scores at its start and at its end
    if variant == "aia":
        c.loss.aia_weight, c.loss.aia_gen_weight, c.loss.aia_und_weight = 10.0, 5.0, 10.0
    return c
