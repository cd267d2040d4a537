"""Configuration of the Emu3 family (transformers `Emu3Config`): one Llama-like decoder, one VQ
tokenizer for both directions, image codes in the text vocabulary.

`Emu3Config` shares the decoder side with `JanusConfig` (`text`, `ffn`, `moe` and the runtime
keys), so `unijax.models.decoder.Decoder`, TA-MoE and AIA capture run unchanged; `vq` is Emu3's
video tokenizer used for images. Visual token k is vocabulary id `visual_token_offset + k`
(transformers keeps a `vocabulary_map`; conversion requires its `<|visual token NNNNNN|>` ids to be
contiguous); an image of `h x w` codes is laid out row by row, each row ended by `eol_token_id`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from unijax.models.config import ImageGrid, MoEConfig, TextConfig, _build, _int_or, check_decoder

VISUAL_TOKEN = re.compile(r"^<\|visual token (\d{6})\|>$")
# special tokens transformers' Emu3 tokenizer / processor use, by vocabulary_map name
SPECIAL_NAMES = {"image_token_id": "<image>", "eol_token_id": "<|extra_200|>", "eof_token_id": "<|extra_201|>",
                 "boi_token_id": "<|image start|>", "eoi_token_id": "<|image end|>",
                 "image_wrapper_token_id": "<|image token|>"}


@dataclasses.dataclass(frozen=True)
class Emu3VQConfig(ImageGrid):
    """transformers `Emu3VQVAEConfig` (images only)."""

    codebook_size: int = 32768
    embed_dim: int = 4
    latent_channels: int = 4
    double_latent: bool = False
    in_channels: int = 3
    out_channels: int = 3
    temporal_factor: int = 4  # transformers: temporal_downsample_factor
    base_channels: int = 256
    channel_multiplier: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (3,)
    hidden_size: int = 1024  # attention width (== channels at the attention levels)
    num_attention_heads: int = 1
    image_size: int = 512  # the square images this model's batches carry

    @property
    def num_embeddings(self) -> int:
        """The codebook size under Janus's name (what losses and decoding read)."""
        return self.codebook_size

    @property
    def num_tokens(self) -> int:
        """Sequence slots of one image: `grid` rows of `grid` codes and an end-of-line token."""
        return self.grid * (self.grid + 1)


@dataclasses.dataclass(frozen=True)
class Emu3Config:
    text: TextConfig = dataclasses.field(default_factory=lambda: TextConfig(
        vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=9216, bos_token_id=151849,
        eos_token_id=151850, pad_token_id=151643))
    vq: Emu3VQConfig = dataclasses.field(default_factory=Emu3VQConfig)
    visual_token_offset: int = 151854
    # "<image>": the understanding placeholder, filled with the image's tokens. A converted checkpoint
    # takes it from its vocabulary_map; this default is "<|extra_202|>", unused by Emu3 and outside
    # the visual-token range (transformers' Emu3Config has no vocabulary_map to read one from).
    image_token_id: int = 151848
    eol_token_id: int = 151846            # "<|extra_200|>": ends each row of image tokens
    eof_token_id: int = 151847            # "<|extra_201|>": ends an image's rows
    boi_token_id: int = 151852            # "<|image start|>"
    eoi_token_id: int = 151853            # "<|image end|>"
    image_wrapper_token_id: int = 151851  # "<|image token|>": after "<|image start|>{h}*{w}", before the rows
    ffn: str = "dense"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "auto"

    family = "emu3"

    def replace(self, **kw) -> Emu3Config:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), family=self.family)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "model") -> Emu3Config:
        subs = {"text": TextConfig, "vq": Emu3VQConfig, "moe": MoEConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key == "family":
                continue
            if key not in known:
                raise KeyError(f"unknown model config key '{where}.{key}'; known keys: {sorted(known)}")
            kw[key] = _build(subs[key], value, f"{where}.{key}") if key in subs else value
        return cls(**kw)

    def visual_ids(self) -> range:
        return range(self.visual_token_offset, self.visual_token_offset + self.vq.codebook_size)

    # -- transformers interop -----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], image_size: int = 0, **runtime) -> Emu3Config:
        """`image_size`: the square images unijax batches will carry (transformers' Emu3 takes any size;
        0 = a 64 x 64 code grid)."""
        if hf.get("model_type") != "emu3":
            raise ValueError(f"config.json has model_type={hf.get('model_type')!r}, expected 'emu3'")
        t, q = hf.get("text_config") or {}, hf.get("vq_config") or {}
        vocab = hf.get("vocabulary_map") or {}
        rope = t.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"text_config rope_type={rope.get('rope_type')!r}: only 'default' RoPE is "
                                      f"supported")
        if t.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"text_config.hidden_act={t.get('hidden_act')!r}: only 'silu' is supported")
        if q.get("double_latent", False):
            raise NotImplementedError("vq_config.double_latent=True is not supported (transformers' quant_conv "
                                      "cannot take it either)")
        visual = sorted((int(m.group(1)), i) for name, i in vocab.items() if (m := VISUAL_TOKEN.match(name)))
        codebook = q.get("codebook_size", 32768)
        if len(visual) != codebook or any(k != j for j, (k, _) in enumerate(visual)):
            raise ValueError(f"config.json vocabulary_map holds {len(visual)} '<|visual token NNNNNN|>' entries; "
                             f"expected codes 0..{codebook - 1} (vq_config.codebook_size)")
        offset = visual[0][1]
        if any(i != offset + k for k, i in visual):
            raise NotImplementedError("vocabulary_map: the visual tokens' ids are not contiguous; only a "
                                      "contiguous visual-token range is supported")
        specials = {}
        for key, name in SPECIAL_NAMES.items():
            if name not in vocab:
                raise ValueError(f"config.json vocabulary_map has no {name!r} (needed for {key})")
            specials[key] = int(vocab[name])
        heads = t.get("num_attention_heads", 32)
        hidden = t.get("hidden_size", 4096)
        text = TextConfig(
            vocab_size=t.get("vocab_size", 184622), hidden_size=hidden,
            intermediate_size=t.get("intermediate_size", 14336), num_layers=t.get("num_hidden_layers", 32),
            num_heads=heads, num_kv_heads=t.get("num_key_value_heads") or heads,
            head_dim=t.get("head_dim") or hidden // heads, rms_norm_eps=t.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1e6))),
            max_position_embeddings=t.get("max_position_embeddings", 9216),
            attention_bias=t.get("attention_bias", False), mlp_bias=t.get("mlp_bias", False),
            initializer_range=float(t.get("initializer_range", 0.02)),
            bos_token_id=_int_or(t.get("bos_token_id"), 151849), eos_token_id=_int_or(t.get("eos_token_id"), 151850),
            pad_token_id=_int_or(t.get("pad_token_id"), 151643))
        mult = tuple(q.get("channel_multiplier", (1, 2, 2, 4)))
        vq = Emu3VQConfig(
            codebook_size=codebook, embed_dim=q.get("embed_dim", 4), latent_channels=q.get("latent_channels", 4),
            in_channels=q.get("in_channels", 3), out_channels=q.get("out_channels", 3),
            temporal_factor=q.get("temporal_downsample_factor", 4), base_channels=q.get("base_channels", 256),
            channel_multiplier=mult, num_res_blocks=q.get("num_res_blocks", 2),
            attn_resolutions=tuple(q.get("attn_resolutions", (3,))), hidden_size=q.get("hidden_size", 1024),
            num_attention_heads=q.get("num_attention_heads", 1),
            image_size=int(image_size or 64 * 2 ** (len(mult) - 1)))
        return cls(text=text, vq=vq, visual_token_offset=offset, **specials, **runtime)

    def vocabulary_map(self) -> dict[str, int]:
        """The special and visual entries of transformers' `vocabulary_map` for this config."""
        out = {name: getattr(self, key) for key, name in SPECIAL_NAMES.items()}
        out.update({f"<|visual token {k:06d}|>": self.visual_token_offset + k for k in range(self.vq.codebook_size)})
        return out

    def to_hf(self) -> dict[str, Any]:
        if self.ffn != "dense":
            raise ValueError(f"model.ffn={self.ffn!r} has no transformers equivalent (only dense Emu3 models convert)")
        t, q = self.text, self.vq
        return {
            "architectures": ["Emu3ForConditionalGeneration"], "model_type": "emu3", "tie_word_embeddings": False,
            "text_config": {
                "model_type": "emu3_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
                "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "max_position_embeddings": t.max_position_embeddings, "attention_bias": t.attention_bias,
                "mlp_bias": t.mlp_bias, "initializer_range": t.initializer_range, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id,
                "pad_token_id": t.pad_token_id, "tie_word_embeddings": False, "attention_dropout": 0.0,
            },
            "vq_config": {
                "model_type": "emu3_vqgan", "codebook_size": q.codebook_size, "embed_dim": q.embed_dim,
                "latent_channels": q.latent_channels, "double_latent": False, "in_channels": q.in_channels,
                "out_channels": q.out_channels, "temporal_downsample_factor": q.temporal_factor,
                "base_channels": q.base_channels, "channel_multiplier": list(q.channel_multiplier),
                "num_res_blocks": q.num_res_blocks, "attn_resolutions": list(q.attn_resolutions),
                "hidden_size": q.hidden_size, "num_attention_heads": q.num_attention_heads,
            },
            "vocabulary_map": self.vocabulary_map(),
        }

    def validate(self) -> Emu3Config:
        t, q = self.text, self.vq
        att_ch = {q.base_channels * q.channel_multiplier[-1]} | {q.base_channels * q.channel_multiplier[i]
                                                                  for i in q.attn_resolutions}
        specials = [getattr(self, k) for k in SPECIAL_NAMES]
        return check_decoder(self, [
            (q.embed_dim == q.latent_channels, "model.vq.embed_dim must equal model.vq.latent_channels (Emu3's "
                                               "decoder runs latents and codes through one temporal stack)"),
            (q.temporal_factor >= 1 and q.temporal_factor & (q.temporal_factor - 1) == 0,
             "model.vq.temporal_factor must be a power of two"),
            (all(0 <= i < len(q.channel_multiplier) for i in q.attn_resolutions),
             "model.vq.attn_resolutions must index levels of channel_multiplier"),
            (att_ch == {q.hidden_size}, f"model.vq.hidden_size={q.hidden_size} must equal the channels at the "
                                        f"attention levels ({sorted(att_ch)})"),
            (all(q.base_channels * m % 32 == 0 for m in q.channel_multiplier),
             "model.vq.base_channels x every channel_multiplier must be a multiple of 32 (GroupNorm)"),
            (q.image_size % q.downsample == 0, "model.vq.image_size must be a multiple of the VQ downsampling"),
            (self.visual_token_offset + q.codebook_size <= t.vocab_size,
             "model.visual_token_offset + model.vq.codebook_size must fit in model.text.vocab_size"),
            (all(0 <= s < t.vocab_size and not self.visual_token_offset <= s < self.visual_token_offset +
                 q.codebook_size for s in specials),
             "the special token ids must lie in the vocabulary, outside the visual tokens"),
        ])
