"""Janus-Pro stage 2: the upcycled TA-MoE model (MMU experts from stage1_und, T2I experts from
stage1_gen, the base FFN as the shared expert) fine-tuned jointly with LoRA r=16 on both tasks;
`:7b+aia` adds the AIA loss with the official weights (5 for T2I, 10 for MMU).

    python -m unijax.upcycle --base ckpt/janus_pro_7b --und workdir/janus_pro_7b/stage1_und/model \
        --gen workdir/janus_pro_7b/stage1_gen/model --out workdir/janus_pro_7b/upcycled
    python -m unijax.train --config configs/janus_pro/stage2.py:7b+aia \
        --config.data.mmu_json=data/llava.json --config.data.mmu_image_root=data/images \
        --config.data.t2i_jsonl=data/captions.jsonl --config.data.t2i_image_root=data/images
"""

from configs import stage2
from configs.janus_pro import common


def get_config(arg=None):
    size, aia = common.parse(arg)
    c = common.recipe(size, "stage2" + ("_aia" if aia else ""))
    c.init_from = f"workdir/janus_pro_{size}/upcycled"
    c.model.ffn = "ta_moe"
    # expert parallelism: the 2 x 4 experts on the 8 devices of the `expert` axis (a node), tokens moved to
    # them by a per-device all-to-all; the frozen bf16 weights replicated over `data` (no fsdp traffic:
    # 64 devices plan 5.5 GB of collectives per step, against 44 GB at fsdp=8 x expert=8; on a 32 GB
    # chip such as v6e, set mesh.data=1, mesh.fsdp=-1 and model.remat_policy=dots: docs/benchmarks.md)
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = -1, 1, 8
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.train.trainable = stage2.TRAINABLE
    c.train.frozen = ()               # the rest is frozen and LoRA-adapted (model.lora.targets)
    c.train.learning_rate = 1e-4
    if aia:
        c.loss.aia_weight, c.loss.aia_gen_weight, c.loss.aia_und_weight = 10.0, 5.0, 10.0
        c.aia.gen_targets = "janus_pro"
        c.aia.und_targets = "janus_pro"
    return c
