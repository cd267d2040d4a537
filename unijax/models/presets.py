"""Model presets: config mappings by name, one table per family (`Family.presets`).

    python -c "from unijax.models.family import preset; print(preset('janus_pro_7b'))"

`model.preset` in an experiment config picks one of `family.get(model.family).presets`; any other
key set under `model` overrides the preset's value (`preset("tiny", text={"num_layers": 2})`).
"""

from __future__ import annotations


def tiny():
    """About 1.9M parameters: trains on a 2-core CPU in minutes (32x32 images, 64 image tokens)."""
    return dict(
        text=dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0),
        vision=dict(image_size=32, patch_size=4, hidden_size=64, num_layers=2, num_heads=2, projection_dim=128),
        vq=dict(num_embeddings=512, embed_dim=8, latent_channels=32, base_channels=32, channel_multiplier=(1, 2, 2),
                num_res_blocks=1, projection_dim=128, image_token_embed_dim=128, image_size=32),
        image_token_id=3, boi_token_id=4, eoi_token_id=5,
    )


def janus_pro_1b():
    """deepseek-community/Janus-Pro-1B."""
    return dict(
        text=dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16,
                  num_kv_heads=16, head_dim=128, max_position_embeddings=16384),
        vision=dict(image_size=384, patch_size=16, hidden_size=1024, num_layers=24, num_heads=16,
                    projection_dim=2048),
        vq=dict(projection_dim=2048, image_token_embed_dim=2048, image_size=384),
    )


def janus_pro_7b():
    """deepseek-community/Janus-Pro-7B."""
    return dict(
        text=dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32,
                  num_kv_heads=32, head_dim=128, max_position_embeddings=16384),
        vision=dict(image_size=384, patch_size=16, hidden_size=1024, num_layers=24, num_heads=16,
                    projection_dim=4096),
        vq=dict(projection_dim=4096, image_token_embed_dim=4096, image_size=384),
    )


PRESETS = {"tiny": tiny, "janus_pro_1b": janus_pro_1b, "janus_pro_7b": janus_pro_7b}


def emu3_tiny():
    """A tiny Emu3-style model (`model.family=emu3`): the tiny decoder over the shapes tokenizer's ids,
    then 512 visual tokens (ids 1024..1535); Emu3's VQ (4x down, 32x32 images -> 8 rows of 8 codes,
    each row ended by end-of-line: 72 slots per image). Ids 1000-1002 (unused by the shapes
    tokenizer) are end-of-line, end-of-frame and the image-token wrapper."""
    t = tiny()["text"]
    return dict(
        text=dict(t, vocab_size=1536, rms_norm_eps=1e-5),
        vq=dict(codebook_size=512, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=(1, 2, 2),
                num_res_blocks=1, attn_resolutions=(2,), hidden_size=64, num_attention_heads=1, temporal_factor=4,
                image_size=32),
        visual_token_offset=1024, image_token_id=3, boi_token_id=4, eoi_token_id=5, eol_token_id=1000,
        eof_token_id=1001, image_wrapper_token_id=1002,
    )


def emu3_chat():
    """Emu3-Chat (transformers' Emu3Config defaults, 8B)."""
    return {}


EMU3_PRESETS = {"tiny": emu3_tiny, "emu3_chat": emu3_chat}

