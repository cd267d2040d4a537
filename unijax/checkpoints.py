"""Model checkpoints: an Orbax PyTree of parameters with the resolved model config beside it.

Layout of a model checkpoint directory `CKPT/`:
    params/        Orbax PyTree checkpoint of the parameters (pure dict of arrays)
    model.json     the JanusConfig (architecture + runtime fields)
    hf/            (converted checkpoints only) the source config.json / generation_config.json

Writes go to a hidden sibling directory that is renamed into place only when complete, so a
failed or interrupted save never leaves a partial `CKPT/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from typing import Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from unijax.models.config import JanusConfig
from unijax.models.janus import Janus


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary directory that becomes `out` on success and vanishes on failure."""
    out = pathlib.Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output path or remove it")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def flat_params(model_or_state) -> dict[str, jax.Array]:
    """{dotted path: array} of a model's (or abstract model's) parameters."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return {".".join(map(str, path)): v.get_value() if hasattr(v, "get_value") else v
            for path, v in nnx.to_flat_state(state)}


def abstract_model(cfg: JanusConfig) -> Janus:
    return nnx.eval_shape(lambda: Janus(cfg, rngs=nnx.Rngs(0)))


def save_params(out, params: dict, cfg: JanusConfig, extra_files: dict[str, str] | None = None,
                overwrite: bool = False):
    """Writes a model checkpoint directory from a pure dict of parameters (arrays) and its config."""
    with atomic_directory(out, overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        (tmp / "model.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def save_model(out, model: Janus, extra_files: dict[str, str] | None = None, overwrite: bool = False):
    """Saves `model`'s parameters and config to the model checkpoint directory `out`."""
    save_params(out, nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg, extra_files, overwrite)


def read_config(ckpt) -> JanusConfig:
    path = pathlib.Path(ckpt) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {ckpt} is not a unijax model checkpoint")
    return JanusConfig.from_dict(json.loads(path.read_text()), where=str(path))


def load_model(ckpt, sharding: Callable[[tuple[int, ...]], jax.sharding.Sharding] | None = None,
               **runtime) -> Janus:
    """Restores a model checkpoint. `runtime` overrides runtime fields (dtype, param_dtype,
    scan_layers, remat_policy, ...); parameters are cast to `param_dtype` on restore."""
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
