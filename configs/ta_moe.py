"""Joint training of the tiny TA-MoE model on the shapes world (both tasks, Gen:Und 1:1): every
decoder FFN is a TA-MoE layer (top-2 of 4 experts per task group + 1 shared expert), routed by
the token's task label, with the task router learnt through L_group.

    python -m unijax.train --config configs/ta_moe.py
    python -m unijax.analyze experts --ckpt workdir/ta_moe/model

From an upcycled dense checkpoint instead of from scratch:

    python -m unijax.upcycle --base workdir/base/model --out workdir/upcycled --noise 0.01
    python -m unijax.train --config configs/ta_moe.py --config.init_from=workdir/upcycled

`moe.*` and `loss.group_weight / balance_weight / z_weight` are the TA-MoE keys (configs/common.py).
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.workdir = "workdir/ta_moe"
    c.model.ffn = "ta_moe"
    c.train.steps = 300
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    return c
