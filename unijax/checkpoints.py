"""Model checkpoints: an Orbax PyTree of parameters with the resolved model config beside it.

Layout of a model checkpoint directory `CKPT/`:
    params/        Orbax PyTree checkpoint of the parameters (pure dict of arrays)
    model.json     the JanusConfig (architecture + runtime fields)
    hf/            (converted checkpoints only) the source config.json / generation_config.json

A LoRA adapter directory (`<workdir>/adapters`, written by a run with `model.lora.rank > 0`) holds
the run's result without merging, as PEFT stores adapters:
    adapter_config.json       rank, alpha, scale, target regexes, `base_model` (a model checkpoint
                              path, relative to this directory or absolute) and the trained paths
    adapter_model.safetensors `lora/<matrix path>/a|b` adapters and `trained/<path>` for every fully
                              trained parameter (routers, alpha, ...), flat float arrays
    model.json                the model config
    base/                     the frozen base weights, only for runs without `init_from`
`load_model` on it restores the base, replaces the trained parameters and merges `W + scale A B`.

Writes go to a hidden sibling directory that is renamed into place only when complete, so a
failed or interrupted save never leaves a partial `CKPT/`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import load_file, save_file

from unijax.io import atomic_directory
from unijax.models import family, lora
from unijax.models.config import JanusConfig
from unijax.models.janus import Janus
from unijax.models.lora import path_str


def flat_params(model_or_state) -> dict[str, jax.Array]:
    """{dotted path: array} of a model's (or abstract model's) parameters."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return {".".join(map(str, path)): v.get_value() if hasattr(v, "get_value") else v
            for path, v in nnx.to_flat_state(state)}


def abstract_model(cfg: JanusConfig) -> Janus:
    """The model of `cfg`'s family (`unijax.models.family`) with abstract parameters."""
    return nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0)))


def save_params(out, params: dict, cfg: JanusConfig, extra_files: dict[str, str | bytes] | None = None,
                overwrite: bool = False):
    """Writes a model checkpoint directory from a pure dict of parameters (arrays) and its config."""
    with atomic_directory(out, overwrite) as tmp:
        ckptr = _local_checkpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        (tmp / "model.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        for name, content in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer this process uses alone: in a multi-process run only process 0 writes model
    checkpoints (from host copies), so Orbax must not wait for the others at its barriers."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"unijax_model_{me}"))


def save_model(out, model: Janus, extra_files: dict[str, str] | None = None, overwrite: bool = False):
    """Saves `model`'s parameters and config to the model checkpoint directory `out`."""
    save_params(out, nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg, extra_files, overwrite)


TOKENIZER_DIR = "tokenizer"  # a checkpoint's own copy of its transformers tokenizer (convert, exports)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/{path_str(p)}": np.asarray(jax.device_get(v))
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def save_adapters(out, cfg: JanusConfig, adapters: dict, trained: dict, lora_info: dict, *,
                  base: str | None = None, base_params: dict | None = None) -> None:
    """Writes a LoRA adapter directory (module docstring). `base`: the `init_from` model checkpoint the
    adapters sit on; without it `base_params` (the frozen base weights) are saved under `base/`."""
    if (base is None) == (base_params is None):
        raise ValueError("save_adapters: give exactly one of base (a checkpoint path) and base_params")
    with atomic_directory(out, overwrite=True) as tmp:
        tensors = {**_flatten(adapters, "lora"), **_flatten(trained, "trained")}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        if base_params is not None:
            save_params(tmp / "base", base_params, cfg)
        info = {**lora_info, "base_model": str(pathlib.Path(base).absolute()) if base else "base",
                "trained": sorted(k.removeprefix("trained/") for k in tensors if k.startswith("trained/"))}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "model.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def _load_adapters(ckpt: pathlib.Path, sharding, runtime) -> Janus:
    info = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    base = pathlib.Path(info["base_model"])
    base = base if base.is_absolute() else ckpt / base
    if not (base / "model.json").is_file():
        raise FileNotFoundError(f"{ckpt / ADAPTER_CONFIG}: base_model {base} is not a unijax model checkpoint")
    model = load_model(base, sharding, **runtime)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = load_file(str(ckpt / ADAPTER_WEIGHTS))
    adapters: dict = {}
    by_path = {}
    for name, value in tensors.items():
        kind, path = name.split("/", 1)
        if kind == "lora":
            *keys, ab = path.split("/")
            node = adapters
            for k in keys:
                node = node.setdefault(k, {})
            node[ab] = value
        else:
            by_path[path] = value

    def take(path, w):
        p = lora.path_str(path)
        if p in by_path:
            if by_path[p].shape != w.shape:
                raise ValueError(f"{ckpt / ADAPTER_WEIGHTS}: trained/{p} has shape {by_path[p].shape}, the base "
                                 f"model's is {w.shape}")
            return jax.device_put(by_path.pop(p).astype(w.dtype), w.sharding)
        return w

    params = jax.tree_util.tree_map_with_path(take, params)
    if by_path:
        raise ValueError(f"{ckpt / ADAPTER_WEIGHTS}: {sorted(by_path)[:3]} are not parameters of the base model {base}")
    adapters = _int_keys(adapters, params)
    merged = lora.merge(params, adapters, float(info["scale"]))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model, state)
    return model


def _int_keys(tree: dict, like: dict) -> dict:
    """String path keys -> the key types of `like` (nnx pure dicts index layers by int)."""
    out = {}
    for k, v in tree.items():
        key = int(k) if k not in like and k.isdigit() and int(k) in like else k
        out[key] = _int_keys(v, like[key]) if isinstance(v, dict) and isinstance(like.get(key), dict) else v
    return out


def read_config(ckpt) -> JanusConfig:
    path = pathlib.Path(ckpt) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {ckpt} is not a unijax model checkpoint")
    return family.config_from_dict(json.loads(path.read_text()), where=str(path))


def load_model(ckpt, sharding: Callable[[tuple[int, ...]], jax.sharding.Sharding] | None = None,
               **runtime) -> Janus:
    """Restores a model checkpoint. `runtime` overrides runtime fields (dtype, param_dtype,
    scan_layers, remat_policy, ...); parameters are cast to `param_dtype` on restore. A LoRA adapter
    directory is restored onto its base model and merged."""
    if (pathlib.Path(ckpt) / ADAPTER_CONFIG).is_file():
        return _load_adapters(pathlib.Path(ckpt).absolute(), sharding, runtime)
    saved = read_config(ckpt)
    if "scan_layers" in runtime and runtime["scan_layers"] != saved.scan_layers:
        raise ValueError(f"{ckpt} was saved with scan_layers={saved.scan_layers}; convert again to change it")
    cfg = saved.replace(**runtime).validate()
    model = abstract_model(cfg)
    abstract = nnx.state(model, nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding(v) if sharding else device),
        nnx.to_pure_dict(abstract))
    restored = ocp.StandardCheckpointer().restore(pathlib.Path(ckpt).absolute() / "params", target)
    nnx.replace_by_pure_dict(abstract, restored)
    nnx.update(model, abstract)
    return model
