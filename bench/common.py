"""What every benchmark script writes: the machine it ran on and an atomically replaced JSON file."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform

import jax


def machine_meta(**extra) -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "host": platform.node(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, **extra}


def write_json(path, payload: dict) -> pathlib.Path:
    """Writes `payload` to `path` through a temporary file: a failed run never leaves half a file."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)
    print(f"\nwrote {out}")
    return out
