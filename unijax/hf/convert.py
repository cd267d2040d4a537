"""transformers Janus / Emu3 directories <-> unijax model checkpoints (see `python -m unijax.convert`).

The family comes from `config.json`'s `model_type` (`Family.hf_model_types`: `janus` for
`JanusForConditionalGeneration`, `emu3` for `Emu3ForConditionalGeneration`); every family goes
through the same rules: every HF tensor consumed, every parameter found with its shape, or nothing
is written.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from flax import nnx

from unijax import checkpoints
from unijax.hf import janus as mapping
from unijax.hf.safetensors_io import WeightDir, read_json, write_weights
from unijax.io import atomic_directory
from unijax.models import family

# HF tensors with no parameter behind them: BatchNorm's step counter (inference never reads it)
IGNORED_SUFFIXES = (".num_batches_tracked",)

# a TA-MoE export: transformers' Janus with the TA-MoE FFN, as code written beside the weights
TA_MOE_CODE = pathlib.Path(__file__).with_name("modeling_ta_moe.py")
TA_MOE_AUTO_MAP = {"AutoConfig": "modeling_ta_moe.JanusTAMoEConfig",
                   "AutoModelForImageTextToText": "modeling_ta_moe.JanusTAMoEForConditionalGeneration"}


class ConversionError(ValueError):
    pass


def _nest(flat: dict[str, np.ndarray], template: dict) -> dict:
    """Puts {dotted path: array} into the nesting (and key types) of a pure-dict `template`."""
    def fill(node, prefix):
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}.") for k, v in node.items()}
        return flat[prefix[:-1]]
    return fill(template, "")


def refuse_existing(out, overwrite: bool) -> None:
    if pathlib.Path(out).exists() and not overwrite:
        raise FileExistsError(f"{pathlib.Path(out).absolute()} already exists; choose another output path or remove "
                              f"it (or --overwrite)")


def _hf_configs(wd: WeightDir) -> tuple[dict, dict | None]:
    hf = wd.config()
    gen_path = wd.dir / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else None
    return hf, gen


def _rename(name: str, table) -> str:
    for pattern, repl in table:
        name = re.sub(pattern, repl, name)
    return name


def hf_to_checkpoint(hf_dir, out, dtype: str = "float32", scan_layers: bool = False, overwrite: bool = False,
                     image_size: int = 0, extra_files=None):
    """Converts a transformers `JanusForConditionalGeneration` or `Emu3ForConditionalGeneration`
    directory into a model checkpoint (`image_size`: Emu3 only, the square image size unijax batches
    will use; 0 = a 64 x 64 code grid).

    Every HF tensor must be consumed and every parameter found with the right shape; otherwise
    a `ConversionError` lists the missing, unknown and mis-shaped tensors and nothing is written.
    `extra_files(cfg) -> {relative path: str | bytes}` adds files to the checkpoint (the CLI's
    tokenizer copy, checked against `cfg` first); an error it raises leaves nothing written.
    """
    refuse_existing(out, overwrite)  # before reading any weight
    wd = WeightDir(hf_dir)
    hf, gen = _hf_configs(wd)
    try:
        fam = family.for_hf_model_type(hf.get("model_type"))
    except ValueError as e:
        wd.close()
        raise ConversionError(f"{wd.dir}/config.json: {e}") from None
    cfg = fam.config_from_hf(hf, gen, image_size=image_size, param_dtype=dtype, dtype=dtype,
                             scan_layers=scan_layers).validate()
    renames = fam.hf_renames
    abstract_state = nnx.state(checkpoints.abstract_model(cfg), nnx.Param)
    abstract = checkpoints.flat_params(abstract_state)
    aliases = {n: n for n in wd.names() if not n.endswith(IGNORED_SUFFIXES)}
    if fam.hf_file_renames:  # names as files may also hold them
        aliases = {_rename(n, fam.hf_file_renames): n for n in aliases}
    available = set(aliases)

    def get(name):
        return wd.get(aliases[name])

    used, missing, mis_shaped, flat = set(), [], [], {}
    n = cfg.text.num_layers
    for path, spec in abstract.items():
        names = [mapping.hf_name(p, renames) for p in mapping.expand_scanned(path, n, scan_layers)]
        absent = [name for name in names if name not in available]
        if absent:
            missing += [f"{name} (for {path}, expected {tuple(spec.shape)})" for name in absent]
            continue
        used.update(names)
        x = mapping.import_tensor(path, get, n, scan_layers, renames)
        if not (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
            mis_shaped.append(f"{names[0]}: dtype {x.dtype}, expected a floating-point tensor for {path}")
            continue
        if not np.isfinite(x.astype(np.float32)).all():
            mis_shaped.append(f"{names[0]}: holds NaN or infinite values ({path})")
            continue
        if x.shape != tuple(spec.shape):
            mis_shaped.append(f"{', '.join(names[:1])}{'...' if len(names) > 1 else ''}: got {x.shape} "
                              f"(after layout change), expected {tuple(spec.shape)} for {path}")
            continue
        flat[path] = x.astype(spec.dtype)
    unknown = [f"{aliases[name]} {tuple(get(name).shape)}" for name in sorted(available - used)]
    if missing or unknown or mis_shaped:
        lines = [f"cannot convert {wd.dir}:"]
        for title, items in (("missing tensors", missing), ("unknown tensors", unknown),
                             ("mis-shaped or invalid tensors", mis_shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items]
        wd.close()
        raise ConversionError("\n".join(lines))
    state = _nest(flat, nnx.to_pure_dict(abstract_state))
    extra = {"hf/config.json": json.dumps(hf, indent=2)}
    if gen is not None:
        extra["hf/generation_config.json"] = json.dumps(gen, indent=2)
    if extra_files is not None:
        try:
            extra.update(extra_files(cfg))
        except Exception:
            wd.close()
            raise
    checkpoints.save_params(out, state, cfg, extra, overwrite)
    wd.close()
    return cfg


def checkpoint_to_hf(ckpt, out, overwrite: bool = False, max_shard_bytes: int = 4 << 30):
    """Writes a directory that `JanusForConditionalGeneration.from_pretrained` (or, for an Emu3
    checkpoint, `Emu3ForConditionalGeneration.from_pretrained`) loads, with the checkpoint's own
    tokenizer files (`<ckpt>/tokenizer`) beside the weights when it carries them."""
    ckpt = pathlib.Path(ckpt)
    refuse_existing(out, overwrite)  # before reading any weight
    model = checkpoints.load_model(ckpt)
    cfg = model.cfg
    if getattr(cfg.vq, "local_encoder", False):
        raise ConversionError(f"{ckpt}: model.vq.local_encoder=True has no transformers equivalent (JanusVQVAE's "
                              f"encoder uses whole-image GroupNorm and attention); its images would encode differently")
    ta_moe = cfg.ffn == "ta_moe"
    fam = family.of(cfg)
    if ta_moe and not fam.exports_ta_moe:
        exporting = [n for n in family.names() if family.get(n).exports_ta_moe]
        raise ConversionError(f"{ckpt}: a {fam.name} TA-MoE model does not export; TA-MoE exports for the "
                              f"{'/'.join(exporting)} family (dense models of every family export)")
    renames = fam.hf_renames
    tensors = {}
    for path, x in checkpoints.flat_params(model).items():
        tensors.update(mapping.export_tensors(path, np.asarray(x), cfg.text.num_layers, cfg.scan_layers, renames))
    for name in [k for k in tensors if k.endswith(".running_var")]:  # BatchNorm's counter, which HF also stores
        tensors[name[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    src = ckpt / "hf"
    hf = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else fam.config_to_hf(cfg)
    if ta_moe:  # trust_remote_code: the modeling code travels with the weights
        hf = {**hf, **cfg.ta_moe_hf(), "auto_map": TA_MOE_AUTO_MAP}
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[cfg.param_dtype]
    hf["dtype"] = dtype
    hf.pop("torch_dtype", None)
    gen = (json.loads((src / "generation_config.json").read_text())
           if (src / "generation_config.json").is_file() else fam.hf_generation_config(cfg))
    with atomic_directory(out, overwrite) as tmp:
        write_weights(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        tokenizer = ckpt / checkpoints.TOKENIZER_DIR
        for f in sorted(tokenizer.iterdir()) if tokenizer.is_dir() else ():
            if f.is_file():
                (tmp / f.name).write_bytes(f.read_bytes())
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if ta_moe:
            (tmp / TA_MOE_CODE.name).write_text(TA_MOE_CODE.read_text())
    return cfg
