"""Stage 0: train the VQ-VAE image tokenizer of the tiny model on shapes-world images
(reconstruction + codebook + commitment losses; everything but `vqmodel` frozen).

    python -m unijax.train --config configs/stage0_vq.py
    python -m unijax.train --config configs/base.py --config.init_from=workdir/stage0_vq/model

Evaluation reports the reconstruction error and `detector_match`: the share of held-out scenes on
whose reconstruction the shapes detector finds exactly the scene's objects.
"""

from configs import common


def get_config(arg=None):
    c = common.get_config(preset=arg or "tiny")
    c.workdir = "workdir/stage0_vq"
    c.train.objective = "vq"
    c.data.und_ratio = 0.0           # images only: the generation-task samples carry them
    c.data.cfg_drop_prob = 0.0
    c.train.trainable = ("vqmodel/.*",)
    c.train.frozen = ()
    c.train.steps = 300
    c.train.batch_size = 16          # 2.5x faster steps than 32 on a 2-core CPU (cache-sized convolutions)
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 30
    c.train.weight_decay = 0.0
    c.train.checkpoint_every = 300
    c.train.eval_every = 300
    c.train.eval_batches = 8
    return c
