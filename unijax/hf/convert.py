"""transformers Janus directory <-> unijax model checkpoint (see `python -m unijax.convert`)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from flax import nnx

from unijax import checkpoints
from unijax.hf import janus as mapping
from unijax.hf.safetensors_io import WeightDir, write_weights
from unijax.models.config import JanusConfig


class ConversionError(ValueError):
    pass


def _nest(flat: dict[str, np.ndarray], template: dict) -> dict:
    """Puts {dotted path: array} into the nesting (and key types) of a pure-dict `template`."""
    def fill(node, prefix):
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}.") for k, v in node.items()}
        return flat[prefix[:-1]]
    return fill(template, "")


def _hf_configs(wd: WeightDir) -> tuple[dict, dict | None]:
    hf = wd.config()
    gen_path = wd.dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    return hf, gen


def hf_to_checkpoint(hf_dir, out, dtype: str = "float32", scan_layers: bool = False, overwrite: bool = False):
    """Converts a transformers `JanusForConditionalGeneration` directory into a model checkpoint.

    Every HF tensor must be consumed and every parameter found with the right shape; otherwise
    a `ConversionError` lists the missing, unknown and mis-shaped tensors and nothing is written.
    """
    wd = WeightDir(hf_dir)
    hf, gen = _hf_configs(wd)
    merged = dict(hf)
    if gen and gen.get("generation_kwargs"):
        merged["generation_kwargs"] = gen["generation_kwargs"]
    cfg = JanusConfig.from_hf(merged, param_dtype=dtype, dtype=dtype, scan_layers=scan_layers).validate()
    abstract_state = nnx.state(checkpoints.abstract_model(cfg), nnx.Param)
    abstract = checkpoints.flat_params(abstract_state)
    available = set(wd.names())
    used, missing, mis_shaped, flat = set(), [], [], {}
    n = cfg.text.num_layers
    for path, spec in abstract.items():
        names = [mapping.hf_name(p) for p in mapping.expand_scanned(path, n, scan_layers)]
        absent = [name for name in names if name not in available]
        if absent:
            missing += [f"{name} (for {path}, expected {tuple(spec.shape)})" for name in absent]
            continue
        used.update(names)
        x = mapping.import_tensor(path, wd.get, n, scan_layers)
        if x.shape != tuple(spec.shape):
            mis_shaped.append(f"{', '.join(names[:1])}{'...' if len(names) > 1 else ''}: got {x.shape} "
                              f"(after layout change), expected {tuple(spec.shape)} for {path}")
            continue
        flat[path] = x.astype(spec.dtype)
    unknown = [f"{name} {tuple(wd.get(name).shape)}" for name in sorted(available - used)]
    if missing or unknown or mis_shaped:
        lines = [f"cannot convert {wd.dir}:"]
        for title, items in (("missing tensors", missing), ("unknown tensors", unknown),
                             ("mis-shaped tensors", mis_shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items]
        wd.close()
        raise ConversionError("\n".join(lines))
    state = _nest(flat, nnx.to_pure_dict(abstract_state))
    extra = {"hf/config.json": json.dumps(hf, indent=2)}
    if gen is not None:
        extra["hf/generation_config.json"] = json.dumps(gen, indent=2)
    checkpoints.save_params(out, state, cfg, extra, overwrite)
    wd.close()
    return cfg


def generation_config(cfg: JanusConfig) -> dict:
    t = cfg.text
    return {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            "generation_kwargs": {"boi_token_id": cfg.boi_token_id, "eoi_token_id": cfg.eoi_token_id,
                                  "num_image_tokens": cfg.vq.num_tokens}}


def checkpoint_to_hf(ckpt, out, overwrite: bool = False, max_shard_bytes: int = 4 << 30):
    """Writes a directory that `JanusForConditionalGeneration.from_pretrained` loads."""
    ckpt = pathlib.Path(ckpt)
    model = checkpoints.load_model(ckpt)
    cfg = model.cfg
    tensors = {}
    for path, x in checkpoints.flat_params(model).items():
        tensors.update(mapping.export_tensors(path, np.asarray(x), cfg.text.num_layers, cfg.scan_layers))
    src = ckpt / "hf"
    hf = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else cfg.to_hf()
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[cfg.param_dtype]
    hf["dtype"] = dtype
    hf.pop("torch_dtype", None)
    gen = (json.loads((src / "generation_config.json").read_text())
           if (src / "generation_config.json").is_file() else generation_config(cfg))
    with checkpoints.atomic_directory(out, overwrite) as tmp:
        write_weights(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return cfg
