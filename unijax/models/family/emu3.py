"""The Emu3 family (`model.family=emu3`): `Emu3Config`, `Emu3`, transformers'
`Emu3ForConditionalGeneration`. One VQ tokenizer reads images both ways: understanding slots get VQ
codes too (no vision tower), and every row of image codes ends with an end-of-line token."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from unijax.contract import GEN_IMAGE, UND_IMAGE
from unijax.models import family, presets
from unijax.models.emu3 import Emu3
from unijax.models.emu3_config import Emu3Config, Emu3VQConfig
from unijax.models.image_inputs import fill_codes

# below these prefixes module names follow transformers'; the prefixes are those of the saved (hub)
# format: transformers renames them on load and back on save
HF_RENAMES = (
    (r"^lm_head\.", "text_model.lm_head."),
    (r"^language_model\.", "text_model.model."),
    (r"^vqmodel\.encoder\.down\.(\d+)\.resample\.", r"vqmodel.encoder.down.\1.downsample."),
    (r"^vqmodel\.decoder\.up\.(\d+)\.resample\.", r"vqmodel.decoder.up.\1.upsample."),
    (r"^vqmodel\.encoder\.down\.", "vqmodel.encoder.down_block.down."),
    (r"^vqmodel\.decoder\.up\.", "vqmodel.decoder.up_block.up."),
    (r"^vqmodel\.quantize\.$", "vqmodel.quantize.embedding."),
)
# the in-memory names (`Emu3ForConditionalGeneration.state_dict()`) -> the saved ones, for files
# written without transformers' renaming
HF_IN_MEMORY = ((r"^lm_head\.", "text_model.lm_head."), (r"^model\.text_model\.", "text_model.model."),
                (r"^model\.vqmodel\.", "vqmodel."))


class Emu3Family(family.Family):
    name = "emu3"
    config_cls = Emu3Config
    model_cls = Emu3
    presets = presets.EMU3_PRESETS
    hf_model_types = ("emu3",)
    hf_renames = HF_RENAMES
    hf_file_renames = HF_IN_MEMORY
    checks_tokenizer = False  # its special tokens are names in vocabulary_map, not config ids
    vision_tower = False
    model_keys = {"vision": (), "vq": tuple(f.name for f in dataclasses.fields(Emu3VQConfig))}

    def config_from_hf(self, hf, generation, *, image_size: int = 0, **runtime):
        return Emu3Config.from_hf(hf, image_size=image_size, **runtime)

    def hf_generation_config(self, cfg):
        t = cfg.text
        return {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}

    def image_layout(self, cfg):
        size = cfg.vq.image_size
        patch = size // cfg.vq.grid
        return family.ImageLayout(image_size=size, und_patch=patch, gen_patch=patch, boi_id=cfg.boi_token_id,
                                  eol_id=cfg.eol_token_id, und_rule="emu3")

    def und_prompt_tokens(self, cfg, layout_und_tokens):
        return cfg.vq.num_tokens  # transformers' placeholder layout: rows of codes and end-of-line

    def prepare_inputs(self, model, batch, images_per_row):
        n_und, n_gen = images_per_row
        tokens = fill_codes(model, batch, batch["tokens"], GEN_IMAGE, n_gen)
        return fill_codes(model, batch, tokens, UND_IMAGE, n_und), None

    def unconditional_keep(self, tokens, cfg):
        # BOS and the image header (`<|image start|>h*w<|image token|>`, from the last begin-of-image on)
        t = tokens.shape[1]
        last_boi = jnp.max(jnp.where(tokens == cfg.boi_token_id, jnp.arange(t), -1), axis=1, keepdims=True)
        return (tokens == cfg.text.bos_token_id) | ((jnp.arange(t) >= last_boi) & (last_boi >= 0))

    def embed_image_slot(self, model, code, slot):
        cfg = model.cfg
        ids = jnp.where((slot + 1) % (cfg.vq.grid + 1) == 0, cfg.eol_token_id, code + cfg.visual_token_offset)
        return model.language_model.embed_tokens(ids)

    def code_slots(self, cfg, num_tokens):
        # the end-of-line slots hold no code (their sampled code was replaced by end-of-line)
        return np.asarray([i for i in range(num_tokens) if (i + 1) % (cfg.vq.grid + 1) != 0])


family.register(Emu3Family())
