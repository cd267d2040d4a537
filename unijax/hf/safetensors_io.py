"""Reading and writing transformers weight directories with numpy (no torch, never unpickling)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_json(path: pathlib.Path) -> dict:
    """A JSON object file; a truncated or malformed one is a ValueError naming it."""
    try:
        out = json.loads(pathlib.Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: a JSON {type(out).__name__}, expected an object")
    return out


def _open(path: pathlib.Path):
    """`safe_open` with a bad header (junk bytes, a declared size past the file) as a ValueError naming the file."""
    try:
        return safe_open(path, framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


class WeightDir:
    """Lazy view of a transformers directory's safetensors (single file or sharded index)."""

    def __init__(self, directory: str | pathlib.Path):
        self.dir = pathlib.Path(directory)
        if not (self.dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.dir}/config.json not found: --hf_dir must be a transformers model directory")
        if (self.dir / INDEX).is_file():
            weight_map = read_json(self.dir / INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{self.dir / INDEX}: no 'weight_map' object")
            self.files = {name: self.dir / f for name, f in weight_map.items()}
            missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
            if missing:
                raise FileNotFoundError(f"{self.dir}/{INDEX} names shard files that do not exist: {missing}")
        elif (self.dir / SINGLE).is_file():
            with _open(self.dir / SINGLE) as f:
                self.files = dict.fromkeys(f.keys(), self.dir / SINGLE)
        else:
            pickled = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt*"))
            hint = (f" It holds pickled weights ({', '.join(pickled)}), which unijax never loads: convert them to "
                    "safetensors first, e.g. `JanusForConditionalGeneration.from_pretrained(DIR)"
                    ".save_pretrained(OUT, safe_serialization=True)` in a trusted environment.") if pickled else ""
            raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {self.dir}.{hint}")
        self._handles: dict[pathlib.Path, object] = {}

    def config(self) -> dict:
        return read_json(self.dir / "config.json")

    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = _open(path).__enter__()
        try:
            return self._handles[path].get_tensor(name)
        except Exception as e:  # safetensors' error for data past the end of a truncated file
            raise ValueError(f"{path}: tensor {name!r} cannot be read ({type(e).__name__}: {e}); the file is "
                             f"truncated or corrupt") from None

    def close(self):
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def write_weights(directory: pathlib.Path, tensors: dict[str, np.ndarray], max_shard_bytes: int = 4 << 30):
    """Writes `model.safetensors`, or numbered shards plus an index past `max_shard_bytes`."""
    total = sum(t.nbytes for t in tensors.values())
    meta = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file(tensors, str(directory / SINGLE), metadata=meta)
        return
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
