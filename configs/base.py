"""Joint dense training of the tiny unified model on the shapes world (both tasks, Gen:Und 1:1):
our stand-in for a pretrained Janus-Pro, and the starting point of the TA-MoE / AIA stages. Like
Janus-Pro, it starts from a decoder that already knows the language (configs/stage0_lm.py).

    python -m unijax.train --config configs/base.py
    python -m unijax.train --config configs/base.py --config.train.steps=50 --config.workdir=/tmp/quick

Rerunning the same command resumes from the latest checkpoint in `workdir`. The trained model is
written to `<workdir>/model`. `--config configs/base.py:janus_pro_1b` swaps the model preset.
"""

from configs import common


def get_config(arg=None):
    c = common.get_config(preset=arg or "tiny")
    c.workdir = "workdir/base"
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 60
    c.train.checkpoint_every = 200
    c.train.eval_every = 150
    # Janus-Pro reads images with a pretrained SigLIP: a fresh run first trains the tower alone to tag
    # the shapes identities (about 100 s; skipped with init_from, whose tower is already trained)
    c.vision_pretrain.steps = 800
    # then, as Janus-Pro's stage I, 150 steps train the adaptors (aligners, generation embeddings and head) with
    # the decoder frozen, so that images map onto what the language stage taught it before the decoder moves
    # (docs/shapes_testbed.md, "An adaptor warm-up": POPE 0.79 -> 0.86)
    c.adaptor_warmup.steps = 150
    # three questions per image (three chat turns): 3x the answer supervision per understanding row
    c.data.turns_per_image = 3
    c.data.max_len = 160
    c.train.eval_batches = 16  # 256 held-out questions: per-kind accuracies of ~35 questions, not ~18
    # decoder weights start at std ~1/sqrt(width) instead of transformers' 0.02 (sized for widths near
    # 2,000): at width 128 a 0.02 start leaves attention uniform and lookup answers on a long plateau
    # (docs/shapes_testbed.md, "A wider initialisation")
    c.model.text.initializer_range = 0.088
    c.train.frozen = ("vqmodel/.*",)  # the VQ tokenizer is fixed (stage 0 trains it)
    # without init_from, the language stage (configs/stage0_lm.py: the decoder on scenes in words) and stage
    # 0's VQ on top of it (configs/stage0_vq.py) are built first, in <workdir>/prerequisites/, and the run
    # starts from that model (its vision tower untrained: pre-trained here)
    c.init_recipe = "stage0_vq"
    return c
