"""Tiny random transformers Janus models, saved locally for parity tests (no downloads)."""

from __future__ import annotations

import math

import torch

VOCAB, IMAGE_TOKEN, BOI, EOI, BOS, EOS, PAD = 300, 299, 298, 297, 1, 2, 0


def tiny_config(gqa: bool):
    from transformers import JanusConfig

    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                         max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=64, num_image_tokens=16),
        vq_config=dict(embed_dim=8, num_embeddings=48, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, projection_dim=64, image_token_embed_dim=64),
        image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)


@torch.no_grad()
def rerandomize(model, seed: int):
    """Replaces HF's tiny-std init with unit-scale weights so outputs are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:  # norm weights
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
            if "embed" in name or "position_embedding" in name or "quantize" in name:
                fan_in = 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def make_tiny_janus(directory, gqa: bool, seed: int = 0):
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_config(gqa)).eval()
    rerandomize(model, seed)
    gc = model.generation_config
    gc._from_model_config = False
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = BOS, EOS, PAD
    gc.generation_kwargs = {"boi_token_id": BOI, "eoi_token_id": EOI}
    model.save_pretrained(directory)
    return model
