"""Preference fine-tuning (DPO) of the stage-2 TA-MoE model on both tasks, on shapes-world pairs.

Understanding pairs answer a question about the scene right (chosen) and with an answer the same
kind of question gets in other scenes (rejected); generation pairs are the caption's scene (chosen)
and another scene (rejected) (`unijax.data.preference.ShapesPairs`). The stage-2 model is frozen
and adapted by fresh LoRA adapters (rank 16); the reference is the same network with the adapters
off, so no second copy of the weights exists. The sigmoid loss with beta = 0.1, both tasks 1:1 in
every batch.

    python -m unijax.train --config configs/dpo.py      # builds stage 2 first, as the main job does

Your own pairs (align-anything's or TRL's JSON Lines, docs/preference.md):

    python -m unijax.train --config configs/dpo.py --config.init_from=workdir/stage2/model \\
        --config.data.source=files --config.data.pref_jsonl=data/pairs.jsonl \\
        --config.data.pref_image_root=data/images
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.workdir = "workdir/dpo"
    c.model.ffn = "ta_moe"
    # without init_from: the recipe's models up to stage 2 are built first, each cached in
    # <workdir>/prerequisites/ (a rerun reuses them); the run then starts from the stage-2 model
    c.init_recipe = "stage2"
    c.train.objective = "dpo"
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.train.trainable = ()             # the adapters alone train: the reference is the adapters-off model
    c.train.frozen = ()
    c.vision_pretrain.steps = 0
    c.adaptor_warmup.steps = 0
    c.data.turns_per_image = 1
    c.train.steps = 100
    c.train.batch_size = 16            # pairs: 32 rows a step
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 10
    c.train.checkpoint_every = 50
    c.train.eval_every = 50
    c.train.eval_at_start = True
    c.eval.evaluators = ("preference_heldout", "suites")
    return c
