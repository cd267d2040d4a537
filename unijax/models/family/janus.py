"""The Janus / Janus-Pro family (`model.family=janus`): `JanusConfig`, `Janus`, transformers'
`JanusForConditionalGeneration` (and unijax's TA-MoE export, `janus_ta_moe`). A SigLIP tower reads
understanding images; the VQ codes generated ones, fed back through the generation embedding."""

from __future__ import annotations

from unijax.models import family, presets
from unijax.models.config import TA_MOE_MODEL_TYPE, JanusConfig
from unijax.models.janus import Janus

# our dotted parameter path -> transformers' name, in order (`unijax.hf.janus`)
HF_RENAMES = (
    (r"^lm_head\.", "lm_head."),
    (r"^vision_model\.layers\.", "model.vision_model.encoder.layers."),
    (r"^(vqmodel\.encoder\.down\.\d+)\.resample\.", r"\1.downsample."),
    (r"^(vqmodel\.decoder\.up\.\d+)\.resample\.", r"\1.upsample."),
    (r"^vqmodel\.quantize\.$", "vqmodel.quantize.embedding."),
    (r"^(?!lm_head\.|model\.)", "model."),
)


class JanusFamily(family.Family):
    name = "janus"
    config_cls = JanusConfig
    model_cls = Janus
    presets = presets.PRESETS
    hf_model_types = ("janus", TA_MOE_MODEL_TYPE)
    hf_renames = HF_RENAMES
    exports_ta_moe = True


family.register(JanusFamily())
