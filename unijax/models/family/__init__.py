"""Model families: one `Family` object per architecture answers every question that differs between
them, and the rest of unijax asks it instead of branching on names.

    fam = family.of(cfg)            # the family of a model config (`cfg.family`)
    fam = family.get("emu3")        # by `model.family`
    model = family.build(cfg, nnx.Rngs(0))

A family states:
- its config class, presets and model class (`config_from_dict`, `preset`, `build`);
- its transformers interop: `config.json` model types, the parameter-name table, the generation
  config, whether a TA-MoE model exports (`unijax.hf.convert`);
- how a batch of the contract feeds its images (`prepare_inputs`), its token layout for the data
  pipeline (`image_layout`) and for prompts (`und_prompt_tokens`);
- its image-decoding hooks: the CFG null prompt, the slots of one image, how a sampled code is fed
  back (`unijax.inference.decode`);
- which `model.*` keys an experiment config may set, and whether it has a vision tower to pre-train.

`janus` (`unijax.models.family.janus`) and `emu3` (`unijax.models.family.emu3`) are built in; a
new family is one module with a `Family` subclass passed to `register` (tests/test_family.py
registers a third). Config classes carry their family's name as the class attribute `family`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from unijax.contract import GEN_IMAGE
from unijax.models.config import family_of
from unijax.models.image_inputs import fill_codes, understanding_images

Array = jax.Array

__all__ = ["Family", "ImageLayout", "build", "config_from_dict", "family_of", "get", "for_hf_model_type", "names",
           "of", "preset", "register", "with_overrides"]


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How images sit in a family's token sequences (`unijax.data.pipeline.Layout` takes these)."""

    image_size: int     # square images, pixels a side
    und_patch: int      # pixels a side per understanding-image token
    gen_patch: int      # pixels a side per generated-image token
    boi_id: int         # begin-of-image id
    eol_id: int = -1    # >= 0: an end-of-line id after every row of image tokens
    und_rule: str = "janus"  # how an understanding image becomes square (`unijax.data.images.RULES`)


class Family:
    """The questions whose answer depends on the model family. Subclasses set the class attributes
    and override the methods whose default (a Janus-like model: a vision tower reads understanding
    images, the VQ codes generated ones) does not hold."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object     # from_dict(d, where=) / to_dict() / validate() / from_hf / to_hf
    model_cls: ClassVar[type] = object      # model_cls(cfg, rngs=rngs)
    presets: ClassVar[Mapping[str, Callable[[], dict]]] = {}
    hf_model_types: ClassVar[tuple[str, ...]] = ()  # config.json `model_type`s this family reads
    hf_renames: ClassVar[tuple] = ()        # our dotted parameter path -> HF name: ordered (regex, repl)
    hf_file_renames: ClassVar[tuple] = ()   # names as files may hold them -> the names hf_renames makes
    exports_ta_moe: ClassVar[bool] = False  # a TA-MoE model of this family converts to transformers
    checks_tokenizer: ClassVar[bool] = True  # convert checks a carried tokenizer's special ids against the config
    vision_tower: ClassVar[bool] = True     # a separate understanding encoder (vision pre-training applies)
    model_keys: ClassVar[Mapping[str, tuple[str, ...] | None]] = {}  # model.<sub>.* keys: None = all of them

    # -- configs and models ----------------------------------------------------------------
    def config_from_dict(self, d: Mapping[str, Any], *, where: str = "model"):
        return self.config_cls.from_dict(d, where=where)  # config classes skip their `family` key

    def build(self, cfg, rngs):
        return self.model_cls(cfg, rngs=rngs)

    def check_model_keys(self, key: str, value: Mapping[str, Any]) -> None:
        """Refuses `model.<key>.*` entries (set in an experiment config) that this family has not."""
        if key not in self.model_keys:
            return
        known = self.model_keys[key]
        bad = sorted(set(value) - set(known)) if known is not None else []
        if bad:
            raise ValueError(f"model.{key}.{bad[0]}: model.family={self.name} has no such key (its model.{key} "
                             f"keys are {list(known) or 'none'})")

    # -- transformers interop --------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], generation: Mapping[str, Any] | None, *, image_size: int = 0,
                       **runtime):
        """The config of a transformers `config.json` (`generation`: its generation_config.json)."""
        merged = dict(hf)
        if generation and generation.get("generation_kwargs"):
            merged["generation_kwargs"] = generation["generation_kwargs"]
        return self.config_cls.from_hf(merged, **runtime)

    def config_to_hf(self, cfg) -> dict[str, Any]:
        return cfg.to_hf()

    def hf_generation_config(self, cfg) -> dict[str, Any]:
        t = cfg.text
        return {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
                "generation_kwargs": {"boi_token_id": cfg.boi_token_id, "eoi_token_id": cfg.eoi_token_id,
                                      "num_image_tokens": cfg.vq.num_tokens}}

    # -- batches ---------------------------------------------------------------------------
    def image_layout(self, cfg) -> ImageLayout:
        size = cfg.vision.image_size
        if cfg.vq.image_size != size:
            raise ValueError(f"model.vision.image_size={size} differs from model.vq.image_size={cfg.vq.image_size}")
        return ImageLayout(image_size=size, und_patch=cfg.vision.patch_size, gen_patch=size // cfg.vq.grid,
                           boi_id=cfg.boi_token_id)

    def und_prompt_tokens(self, cfg, layout_und_tokens: int) -> int:
        """Placeholder tokens of one understanding image in a prompt."""
        return layout_und_tokens

    def prepare_inputs(self, model, batch: dict[str, Array], images_per_row: tuple[int, int]):
        """-> (tokens with the frozen VQ's codes at generated-image slots `[B, T]`, understanding pixels
        `[B, n, H, W, 3]` for the vision tower, or None when no row has such images)."""
        cfg = model.cfg
        n_und, n_gen = images_per_row
        tokens = fill_codes(model, batch, batch["tokens"], GEN_IMAGE, n_gen)
        return tokens, (understanding_images(cfg, batch, n_und).astype(cfg.dtype) if n_und else None)

    # -- image decoding --------------------------------------------------------------------
    def unconditional_keep(self, tokens: Array, cfg) -> Array:
        """The tokens of a generation prompt the CFG null prompt keeps (the rest become padding)."""
        return (tokens == cfg.text.bos_token_id) | (tokens == cfg.boi_token_id)

    def embed_image_slot(self, model, code: Array, slot: Array) -> Array:
        """The input embedding of sampled `code` `[B, 1]` at image slot `slot` (the next step's input)."""
        return model.embed_image_codes(code)

    def code_slots(self, cfg, num_tokens: int) -> np.ndarray | None:
        """The slots among the first `num_tokens` that hold image codes (None: all of them)."""
        return None


_REGISTRY: dict[str, Family] = {}
_DEFAULT = "janus"


def register(fam: Family) -> Family:
    """Adds `fam` under `fam.name` (a name taken by another family class is refused)."""
    if not fam.name:
        raise ValueError(f"{type(fam).__name__}.name is empty")
    old = _REGISTRY.get(fam.name)
    if old is not None and type(old) is not type(fam):
        raise ValueError(f"model family {fam.name!r} is already registered by {type(old).__name__}")
    _REGISTRY[fam.name] = fam
    return fam


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY, key=lambda n: (n != _DEFAULT, n)))  # the default first


def get(name: str, *, key: str = "model.family") -> Family:
    if name not in _REGISTRY:
        raise ValueError(f"{key}={name!r} is not one of {names()}")
    return _REGISTRY[name]


def of(cfg) -> Family:
    """The family of a model config."""
    return get(family_of(cfg))


def for_hf_model_type(model_type) -> Family:
    for fam in _REGISTRY.values():
        if model_type in fam.hf_model_types:
            return fam
    known = [t for fam in _REGISTRY.values() for t in fam.hf_model_types]
    raise ValueError(f"config.json has model_type={model_type!r}; expected one of {known}")


def build(cfg, rngs):
    """A freshly initialised model of `cfg`'s family."""
    return of(cfg).build(cfg, rngs)


def config_from_dict(d: Mapping[str, Any], *, where: str = "model"):
    """A `model.json` / preset mapping -> its family's config (`family` key; absent = janus)."""
    return get(d.get("family", _DEFAULT), key=f"{where}.family").config_from_dict(d, where=where)


def preset(name: str, family: str = _DEFAULT, **overrides):
    """The named preset of `family` (`get(family).presets`) with `overrides` on top, validated."""
    presets = get(family).presets
    if name not in presets:
        raise KeyError(f"model.preset={name!r} is not a {family} preset; choose one of {sorted(presets)}")
    return with_overrides(presets[name](), family, **overrides)


def with_overrides(d: Mapping[str, Any], family: str = _DEFAULT, **overrides):
    """A config mapping (a preset's, or a checkpoint's `model.json`) with `overrides` on top,
    sub-configs merged key by key, as a validated config."""
    d = dict(d)
    for key, value in overrides.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, Mapping) else value
    return config_from_dict(dict(d, family=family)).validate()


def null_prompt(tokens: Array, cfg) -> Array:
    """The CFG null prompt of generation prompts `tokens` `[B, T]` (`Family.unconditional_keep`)."""
    return jnp.where(of(cfg).unconditional_keep(tokens, cfg), tokens, cfg.text.pad_token_id)


# the built-in families register themselves
from unijax.models.family import emu3, janus  # noqa: E402,F401
