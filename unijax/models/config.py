"""Model configuration: frozen dataclasses for the Janus-Pro architecture.

`JanusConfig` is the one object every model module reads. It is built from a preset name
(`unijax.models.presets`), from an `ml_collections.ConfigDict` (the `model` block of an experiment
config), or from a transformers `config.json` (`from_hf`), and written back with `to_hf`.
Architecture fields mirror transformers' `JanusConfig`; runtime fields (dtype, scan, remat)
do not change the parameters' values, only how they are stored and computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# The model-side enums, each defined here once.
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")  # model.attention_impl
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")  # model.remat_policy
AIA_IMPLS = ("lean", "explicit")  # how attention layers measure AIA intensities (aia.impl)


def family_of(cfg) -> str:
    """The name of the family a model config belongs to (its class attribute `family`;
    `unijax.models.family`)."""
    return getattr(cfg, "family", "janus")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder (transformers `LlamaConfig`)."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 16384
    attention_bias: bool = False
    mlp_bias: bool = False
    # std of every decoder weight at initialisation (embeddings, attention, MLP / experts, lm_head);
    # transformers' `initializer_range`. 0.02 suits widths near 2,000; configs/base.py sets 0.088
    # (~1/sqrt(width)) for the 128-wide tiny decoder
    initializer_range: float = 0.02
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    pad_token_id: int = 100002


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP-style understanding encoder and its aligner (transformers `JanusVisionConfig`)."""

    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    attention_bias: bool = True
    aligner_depth: int = 2
    projection_dim: int = 2048  # aligner output width == text hidden size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ImageGrid:
    """The code grid of a VQ tokenizer config with `channel_multiplier` levels and `image_size`."""

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


@dataclasses.dataclass(frozen=True)
class VQConfig(ImageGrid):
    """VQ-16 image tokenizer plus the generation aligner/head (transformers `JanusVQVAEConfig`)."""

    num_embeddings: int = 16384
    embed_dim: int = 8
    latent_channels: int = 256
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    num_groups: int = 32
    aligner_depth: int = 2  # transformers: vq_config.num_hidden_layers
    projection_dim: int = 2048
    image_token_embed_dim: int = 2048
    image_size: int = 384  # generated image resolution
    # unijax only (False: transformers' JanusVQVAE): the encoder normalises each position over its
    # channels instead of GroupNorm's whole-image statistics, and skips its attention blocks, so a
    # code depends on its neighbourhood only (an empty cell gets the same code wherever the objects
    # are: docs/shapes_testbed.md, "Where the image-code loss goes"). Same parameters; the decoder
    # is unchanged. Such a model does not export to transformers.
    local_encoder: bool = False

    @property
    def num_tokens(self) -> int:
        return self.grid**2


RUNTIME_KEYS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")  # never change values
# `moe.*` fields a checkpoint's parameters do not depend on: a run may set them freely over `init_from`
# (alpha_init only initialises alpha, which the checkpoint holds)
MOE_RUNTIME_KEYS = ("group_assignment", "impl", "capacity_factor", "alpha_init")

GROUP_ASSIGNMENTS = ("label", "router", "soft")
MOE_IMPLS = ("auto", "dropless", "capacity")
TA_MOE_MODEL_TYPE = "janus_ta_moe"  # config.json of an exported TA-MoE model (unijax/hf/modeling_ta_moe.py)
FFNS = ("dense", "ta_moe")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """TA-MoE FFN settings (`unijax.models.moe`), read when `ffn == "ta_moe"`; the `moe.*` config keys."""

    num_experts_per_group: int = 4
    num_shared_experts: int = 1
    top_k: int = 2
    expert_intermediate_size: int = 0  # 0: the dense FFN's text.intermediate_size (upcycling copies it)
    group_assignment: str = "label"  # label | router | soft
    impl: str = "auto"  # auto (capacity on CPU/GPU, dropless on TPU) | dropless (per-device sort, megablox on TPU) | capacity
    capacity_factor: float = 1.25
    alpha_init: float = 1.0
    layers: tuple[int, ...] = ()  # decoder layers that get TA-MoE; empty = every layer

    def validate(self, num_layers: int) -> MoEConfig:
        checks = [
            (self.num_experts_per_group >= 1, "moe.num_experts_per_group must be >= 1"),
            (self.num_shared_experts >= 0, "moe.num_shared_experts must be >= 0"),
            (1 <= self.top_k <= self.num_experts_per_group,
             f"moe.top_k={self.top_k} must be in [1, moe.num_experts_per_group={self.num_experts_per_group}]"),
            (self.expert_intermediate_size >= 0, "moe.expert_intermediate_size must be >= 0"),
            (self.group_assignment in GROUP_ASSIGNMENTS,
             f"moe.group_assignment={self.group_assignment!r} is not one of {'|'.join(GROUP_ASSIGNMENTS)}"),
            (self.impl in MOE_IMPLS, f"moe.impl={self.impl!r} is not one of {'|'.join(MOE_IMPLS)}"),
            (self.capacity_factor > 0, "moe.capacity_factor must be positive"),
            (all(0 <= i < num_layers for i in self.layers),
             f"moe.layers={self.layers} must index decoder layers 0..{num_layers - 1}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self

    def is_moe_layer(self, index: int) -> bool:
        return not self.layers or index in self.layers


@dataclasses.dataclass(frozen=True)
class JanusConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    vq: VQConfig = dataclasses.field(default_factory=VQConfig)
    image_token_id: int = 100581  # understanding-image placeholder
    boi_token_id: int = 100016  # begin of image
    eoi_token_id: int = 100593  # end of image
    ffn: str = "dense"  # dense | ta_moe (unijax.models.moe; moe.* below)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    # Runtime options: how parameters are stored and computed, never their values.
    dtype: str = "float32"  # activation / matmul dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"  # none | full | dots | dots_no_batch
    # auto (by target platform: tpu -> splash, gpu -> cudnn, else xla) | xla (explicit softmax) | chunked (query
    # blocks, O(T) memory) | cudnn (cuDNN flash attention) | splash (Pallas TPU kernel); unijax.models.layers.attention
    attention_impl: str = "auto"

    family = "janus"  # model.family (`unijax.models.family`); a class attribute, not a field

    def replace(self, **kw) -> JanusConfig:
        return dataclasses.replace(self, **kw)

    # -- dict round trip ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), family=self.family)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "model") -> JanusConfig:
        """Builds a config from a nested mapping, refusing unknown keys (named with `where`)."""
        subs = {"text": TextConfig, "vision": VisionConfig, "vq": VQConfig, "moe": MoEConfig}
        kw: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key == "family":
                continue
            if key not in known:
                raise KeyError(f"unknown model config key '{where}.{key}'; known keys: {sorted(known)}")
            if key in subs:
                kw[key] = _build(subs[key], value, f"{where}.{key}")
            else:
                kw[key] = value
        return cls(**kw)

    # -- transformers interop -----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime) -> JanusConfig:
        """Reads a transformers `JanusConfig` dict (the content of `config.json`)."""
        if hf.get("model_type") not in ("janus", TA_MOE_MODEL_TYPE):
            raise ValueError(f"config.json has model_type={hf.get('model_type')!r}, expected 'janus' "
                             f"(or {TA_MOE_MODEL_TYPE!r}, unijax's TA-MoE export)")
        t, v, q = hf.get("text_config", {}), hf.get("vision_config", {}), hf.get("vq_config", {})
        rope = t.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", (t.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"text_config rope_type={rope_type!r}: only 'default' RoPE is supported")
        if v.get("use_qk_norm", False):
            raise NotImplementedError("vision_config.use_qk_norm=True is not supported")
        for sub, key, want in (("text_config", t.get("hidden_act", "silu"), "silu"),
                               ("vision_config", v.get("hidden_act", "gelu"), "gelu"),
                               ("vq_config", q.get("hidden_act", "gelu"), "gelu")):
            if key != want:
                raise NotImplementedError(f"{sub}.hidden_act={key!r}: only {want!r} is supported")
        heads = t.get("num_attention_heads", 32)
        hidden = t.get("hidden_size", 4096)
        gen = hf.get("generation_kwargs") or {}
        text = TextConfig(
            vocab_size=t.get("vocab_size", 32000),
            hidden_size=hidden,
            intermediate_size=t.get("intermediate_size", 11008),
            num_layers=t.get("num_hidden_layers", 32),
            num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads") or heads,
            head_dim=t.get("head_dim") or hidden // heads,
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
            max_position_embeddings=t.get("max_position_embeddings", 2048),
            attention_bias=t.get("attention_bias", False),
            mlp_bias=t.get("mlp_bias", False),
            initializer_range=float(t.get("initializer_range", 0.02)),
            bos_token_id=_int_or(t.get("bos_token_id"), 1),
            eos_token_id=_int_or(t.get("eos_token_id"), 2),
            pad_token_id=_int_or(t.get("pad_token_id"), 0),
        )
        vision = VisionConfig(
            image_size=v.get("image_size", 384),
            patch_size=v.get("patch_size", 16),
            num_channels=v.get("num_channels", 3),
            hidden_size=v.get("hidden_size", 1024),
            num_layers=v.get("num_hidden_layers", 24),
            num_heads=v.get("num_attention_heads", 16),
            mlp_ratio=float(v.get("mlp_ratio", 4.0)),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            attention_bias=v.get("attention_bias", True),
            aligner_depth=v.get("depth", 2),
            projection_dim=v.get("projection_dim", 2048),
        )
        num_patches = q.get("num_patches", vision.image_size // vision.patch_size)
        channel_multiplier = tuple(q.get("channel_multiplier", (1, 1, 2, 2, 4)))
        vq = VQConfig(
            num_embeddings=q.get("num_embeddings", 16384),
            embed_dim=q.get("embed_dim", 8),
            latent_channels=q.get("latent_channels", 256),
            base_channels=q.get("base_channels", 128),
            channel_multiplier=channel_multiplier,
            num_res_blocks=q.get("num_res_blocks", 2),
            in_channels=q.get("in_channels", 3),
            out_channels=q.get("out_channels", 3),
            aligner_depth=q.get("num_hidden_layers", 2),
            projection_dim=q.get("projection_dim", 2048),
            image_token_embed_dim=q.get("image_token_embed_dim", 2048),
            image_size=num_patches * 2 ** (len(channel_multiplier) - 1),
        )
        moe = {}
        if hf.get("model_type") == TA_MOE_MODEL_TYPE:
            m = dict(hf.get("ta_moe") or {})
            known = {f.name for f in dataclasses.fields(MoEConfig)}
            if not m or set(m) - known:
                raise ValueError(f"config.json: model_type={TA_MOE_MODEL_TYPE!r} needs a 'ta_moe' entry with keys "
                                 f"among {sorted(known)}, got {sorted(m)}")
            moe = {"ffn": "ta_moe", "moe": MoEConfig(**{**m, "layers": tuple(m.get("layers", ()))})}
        return cls(text=text, vision=vision, vq=vq, image_token_id=hf.get("image_token_id", 100581),
                   boi_token_id=gen.get("boi_token_id", 100016), eoi_token_id=gen.get("eoi_token_id", 100593),
                   **moe, **runtime)

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` content for this architecture (float32 weights). A TA-MoE
        model's has `model_type` `janus_ta_moe` and its `ta_moe` settings (`ta_moe_hf`); the modeling
        code that reads them is written beside the weights (`unijax.hf.convert.checkpoint_to_hf`)."""
        if self.ffn == "ta_moe":
            return {**dataclasses.replace(self, ffn="dense").to_hf(), **self.ta_moe_hf()}
        t, v, q = self.text, self.vision, self.vq
        return {
            "architectures": ["JanusForConditionalGeneration"],
            "model_type": "janus",
            "image_token_id": self.image_token_id,
            "tie_word_embeddings": False,
            "text_config": {
                "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
                "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "max_position_embeddings": t.max_position_embeddings,
                "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias,
                "initializer_range": t.initializer_range, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                "pad_token_id": t.pad_token_id, "tie_word_embeddings": False,
            },
            "vision_config": {
                "model_type": "janus_vision_model", "hidden_size": v.hidden_size,
                "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
                "hidden_act": "gelu", "layer_norm_eps": v.layer_norm_eps, "mlp_ratio": v.mlp_ratio,
                "attention_bias": v.attention_bias, "projection_dim": v.projection_dim,
                "depth": v.aligner_depth, "num_image_tokens": q.num_tokens, "use_qk_norm": False,
            },
            "vq_config": {
                "model_type": "janus_vqgan", "embed_dim": q.embed_dim, "num_embeddings": q.num_embeddings,
                "latent_channels": q.latent_channels, "in_channels": q.in_channels,
                "base_channels": q.base_channels, "channel_multiplier": list(q.channel_multiplier),
                "num_res_blocks": q.num_res_blocks, "out_channels": q.out_channels,
                "projection_dim": q.projection_dim, "num_hidden_layers": q.aligner_depth,
                "hidden_act": "gelu", "image_token_embed_dim": q.image_token_embed_dim,
                "num_patches": q.grid,
            },
        }

    def ta_moe_hf(self) -> dict[str, Any]:
        """The `config.json` entries of a TA-MoE model beyond transformers' Janus ones. The export
        routes by the task router: `group_assignment` `label` (the task given with the batch, for
        training) becomes `router`, as `unijax.generate` decodes by default."""
        m = self.moe
        return {"architectures": ["JanusTAMoEForConditionalGeneration"], "model_type": TA_MOE_MODEL_TYPE,
                "ta_moe": {"num_experts_per_group": m.num_experts_per_group, "num_shared_experts": m.num_shared_experts,
                           "top_k": m.top_k, "expert_intermediate_size": m.expert_intermediate_size,
                           "group_assignment": "soft" if m.group_assignment == "soft" else "router",
                           "layers": list(m.layers)}}

    def validate(self) -> JanusConfig:
        t, v, q = self.text, self.vision, self.vq
        return check_decoder(self, [
            (v.image_size % v.patch_size == 0, "model.vision.image_size must be a multiple of patch_size"),
            (v.hidden_size % v.num_heads == 0, "model.vision.hidden_size must be a multiple of num_heads"),
            (v.projection_dim == t.hidden_size, "model.vision.projection_dim must equal model.text.hidden_size"),
            (q.projection_dim == t.hidden_size, "model.vq.projection_dim must equal model.text.hidden_size"),
            (q.image_token_embed_dim == t.hidden_size,
             "model.vq.image_token_embed_dim must equal model.text.hidden_size"),
            (q.image_size % q.downsample == 0, "model.vq.image_size must be a multiple of the VQ downsampling"),
            (all(q.base_channels * m % q.num_groups == 0 for m in q.channel_multiplier),
             "model.vq.base_channels x every channel_multiplier must be a multiple of num_groups (GroupNorm)"),
        ])


def check_decoder(cfg, family_checks: list[tuple[bool, str]]):
    """Raises the first failed check (`family_checks`, then those of the decoder side every family
    shares: text sizes, runtime keys, ffn / moe); returns `cfg`."""
    t = cfg.text
    checks = [
        (t.num_heads % t.num_kv_heads == 0, "model.text.num_heads must be a multiple of num_kv_heads"),
        (t.head_dim % 2 == 0, "model.text.head_dim must be even (RoPE rotates pairs)"),
        *family_checks,
        (cfg.remat_policy in REMAT_POLICIES,
         f"model.remat_policy={cfg.remat_policy!r} is not one of {'|'.join(REMAT_POLICIES)}"),
        (cfg.attention_impl in ATTENTION_IMPLS,
         f"model.attention_impl={cfg.attention_impl!r} is not one of {'|'.join(ATTENTION_IMPLS)}"),
        (cfg.ffn in FFNS, f"model.ffn={cfg.ffn!r} is not one of {'|'.join(FFNS)}"),
        (not (cfg.ffn == "ta_moe" and cfg.scan_layers and cfg.moe.layers
              and set(cfg.moe.layers) != set(range(t.num_layers))),
         "moe.layers selects some layers only: scanned layers must be identical; set model.scan_layers=False"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    if cfg.ffn == "ta_moe":
        cfg.moe.validate(t.num_layers)
    return cfg


def _int_or(x, default: int) -> int:
    if isinstance(x, (list, tuple)):
        x = x[0] if x else None
    return default if x is None else int(x)


def _build(cls, value, where: str):
    if isinstance(value, cls):
        return value
    known = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, v in dict(value).items():
        if key not in known:
            raise KeyError(f"unknown model config key '{where}.{key}'; known keys: {sorted(known)}")
        kw[key] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def runtime_overrides(saved: JanusConfig, cfg: JanusConfig) -> dict[str, Any]:
    """The fields of `cfg` to put on a checkpoint's `saved` config when loading it for a run of `cfg`:
    the runtime keys, `text.initializer_range` (it only shapes a fresh initialisation) and, for TA-MoE,
    the `moe.*` keys the parameters do not depend on."""
    out: dict[str, Any] = {k: getattr(cfg, k) for k in RUNTIME_KEYS}
    out["text"] = dataclasses.replace(saved.text, initializer_range=cfg.text.initializer_range)
    if saved.ffn == "ta_moe" and cfg.ffn == "ta_moe":
        out["moe"] = dataclasses.replace(saved.moe, **{k: getattr(cfg.moe, k) for k in MOE_RUNTIME_KEYS})
    return out
