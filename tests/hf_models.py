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


def save_janus_tokenizer(path, corpus, *, roles=None, vocab_size: int = 400, declare: bool = False):
    """A tiny byte-level BPE tokenizer trained on `corpus` with Janus-Pro's special tokens of `roles`
    (all by default) in DeepSeek's order (bos, eos, pad, image, boi, eoi: ids 0-5) and its chat
    roles, saved locally; `declare` also names bos / eos / pad in the tokenizer's config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from unijax.data import tokenizer as T

    order = ("bos", "eos", "pad", "image", "boi", "eoi")
    specials = [T.JANUS_SPECIAL_TOKENS[r] for r in order if roles is None or r in roles] + [T.USER_TAG,
                                                                                           T.ASSISTANT_TAG]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(corpus) + [T.JANUS_SYSTEM_PROMPT], trainer)
    named = {f"{r}_token": T.JANUS_SPECIAL_TOKENS[r] for r in ("bos", "eos", "pad")} if declare else {}
    PreTrainedTokenizerFast(tokenizer_object=tk, **named).save_pretrained(str(path))
    return path


# -- Emu3 -----------------------------------------------------------------------------------------
EMU3_VOCAB, EMU3_OFFSET, EMU3_CODES = 400, 300, 64
EMU3_SPECIALS = {"<image>": 399, "<|extra_200|>": 398, "<|extra_201|>": 397, "<|image start|>": 396,
                 "<|image end|>": 395, "<|image token|>": 394}


def tiny_emu3_config():
    from transformers import Emu3Config

    vocab_map = dict(EMU3_SPECIALS)
    vocab_map.update({f"<|visual token {k:06d}|>": EMU3_OFFSET + k for k in range(EMU3_CODES)})
    return Emu3Config(
        text_config=dict(vocab_size=EMU3_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attention_dropout=0.0,
                         tie_word_embeddings=False),
        vq_config=dict(codebook_size=EMU3_CODES, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[2], hidden_size=64,
                       num_attention_heads=2, temporal_downsample_factor=4),
        vocabulary_map=vocab_map, tie_word_embeddings=False)


def make_tiny_emu3(directory, seed: int = 0):
    """A random `Emu3ForConditionalGeneration` (32 px images -> 8 x 8 codes) saved to `directory`;
    BatchNorm running statistics are randomised too, so the temporal blocks are not identities."""
    from transformers import Emu3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(tiny_emu3_config()).eval()
    rerandomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.2 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
        # codebook entries drawn from the encoder's own latents, so random images use many codes
        vq = model.model.vqmodel
        x = torch.rand((4, 3, 32, 32), generator=g) * 2 - 1
        z = vq.quant_conv(vq.encoder(x.unsqueeze(1).repeat(1, 4, 1, 1, 1)).permute(0, 2, 1, 3, 4))
        z = z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])
        pick = torch.randperm(z.shape[0], generator=g)[:EMU3_CODES]
        vq.quantize.embedding.weight.copy_(z[pick] + 0.01 * torch.randn(z[pick].shape, generator=g))
    gc = model.generation_config
    gc._from_model_config = False
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = BOS, EOS, PAD
    model.save_pretrained(directory)
    return model


def hf_guided_logits(hf, ids, codes, guidance):
    """Teacher-forced CFG image-head logits of transformers along a generated code sequence."""
    b = ids.shape[0]
    gc = hf.generation_config
    uncond = ids.clone()
    uncond[(uncond != gc.bos_token_id) & (uncond != BOI)] = gc.pad_token_id
    rows = torch.cat([ids, uncond])
    with torch.no_grad():
        emb = hf.get_input_embeddings()(rows)
        gen = hf.prepare_embeddings_for_image_generation(torch.tensor(codes[:, :-1]).repeat(2, 1))
        h = hf.model.language_model(inputs_embeds=torch.cat([emb, gen], 1)).last_hidden_state
        logits = hf.model.generation_head(h[:, ids.shape[1] - 1:]).numpy()
    return logits[b:] + guidance * (logits[:b] - logits[b:])


def close(ours, ref, rtol=1e-4):
    """max |ours - ref| <= rtol x max |ref| (the parity tests' rule)."""
    import numpy as np

    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol} x {scale:.3g}"


def check_cfg_image_generation(hf, model, ids, guidance: float = 3.0):
    """transformers' greedy `generate(generation_mode="image")` with CFG `guidance` and unijax's decoder
    give the same codes, and the guided image-head logits along them match (`close`)."""
    import jax.numpy as jnp
    import numpy as np

    from unijax.inference import decode
    from unijax.inference.sampling import Sampling

    with torch.no_grad():
        ref_codes = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                do_sample=False, guidance_scale=guidance).numpy()
    codes, logits = decode.generate_image_codes(model, jnp.asarray(ids.numpy()), jnp.ones(ids.shape, jnp.int32),
                                                guidance=guidance, sampling=Sampling(), return_logits=True)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    close(logits, hf_guided_logits(hf, ids, ref_codes, guidance))
    return codes


def check_greedy_text(hf, model, ids, pixels, max_new_tokens: int):
    """transformers' greedy `generate()` on a prompt with an image and unijax's decoder give the same
    tokens (transformers stops at EOS; unijax pads after it)."""
    import jax.numpy as jnp
    import numpy as np

    from unijax.contract import TEXT, UND_IMAGE
    from unijax.inference import decode

    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=torch.tensor(pixels), attention_mask=torch.ones_like(ids),
                          max_new_tokens=max_new_tokens, do_sample=False).numpy()[:, ids.shape[1]:]
    tok = jnp.asarray(ids.numpy())
    mod = jnp.where(tok == IMAGE_TOKEN, UND_IMAGE, TEXT)
    out = np.asarray(decode.generate_text(model, tok, mod, jnp.ones_like(tok),
                                          jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None],
                                          max_new_tokens=max_new_tokens))
    np.testing.assert_array_equal(out[:, :ref.shape[1]], ref)
