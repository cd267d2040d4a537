"""Joint dense training with the AIA loss (Attention Interaction Alignment): base plus
`lambda_gen * L_AIA,gen + lambda_und * L_AIA,und`, which pulls every layer's cross-modal
attention intensity towards a per-layer target (unijax/training/aia.py).

    python -m unijax.train --config configs/aia.py
    python -m unijax.train --config configs/aia.py --config.aia.und_targets=workdir/stage1_und/analysis/intensity_und.json
    python -m unijax.analyze intensity --ckpt workdir/aia/model --task und

Weights are the official code's (5 for T2I, 10 for MMU; the paper's text says 40 for both:
`--config.loss.aia_weight=40 --config.loss.aia_gen_weight=40 --config.loss.aia_und_weight=40`);
targets default to the paper's Janus-Pro table rescaled to the model's depth.
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.workdir = "workdir/aia"
    c.loss.aia_weight = 10.0
    c.loss.aia_gen_weight = 5.0
    c.loss.aia_und_weight = 10.0
    c.aia.gen_targets = "janus_pro"
    c.aia.und_targets = "janus_pro"
    return c
