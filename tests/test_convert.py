"""HF <-> Orbax conversion: round trips, sharded input, scanned layers, refusals, no partial output."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import make_tiny_janus
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from unijax import checkpoints
from unijax.hf.convert import ConversionError, checkpoint_to_hf, hf_to_checkpoint
from unijax.hf.safetensors_io import WeightDir
from unijax.models.family import preset
from unijax.models.janus import Janus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "model"
    make_tiny_janus(d, gqa=True, seed=2)
    return d


def tensors(directory):
    wd = WeightDir(directory)
    out = {name: wd.get(name) for name in wd.names()}
    wd.close()
    return out


def assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_round_trip_float32_is_bit_identical_and_loads(hf_dir, tmp_path):
    hf_to_checkpoint(hf_dir, tmp_path / "ckpt")
    checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "back")
    assert_bit_identical(tensors(hf_dir), tensors(tmp_path / "back"))
    from transformers import JanusForConditionalGeneration

    a = JanusForConditionalGeneration.from_pretrained(hf_dir).eval()
    b = JanusForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert b.generation_config.generation_kwargs["boi_token_id"] == a.generation_config.generation_kwargs["boi_token_id"]


def test_round_trip_bfloat16_is_bit_identical(hf_dir, tmp_path):
    from transformers import JanusForConditionalGeneration

    JanusForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf_to_checkpoint(tmp_path / "bf16", tmp_path / "ckpt", dtype="bfloat16")
    assert checkpoints.read_config(tmp_path / "ckpt").param_dtype == "bfloat16"
    checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "back")
    assert_bit_identical(tensors(tmp_path / "bf16"), tensors(tmp_path / "back"))


def test_sharded_index_and_scanned_layers(hf_dir, tmp_path):
    from transformers import JanusForConditionalGeneration

    JanusForConditionalGeneration.from_pretrained(hf_dir).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf_to_checkpoint(tmp_path / "sharded", tmp_path / "scan", scan_layers=True)
    hf_to_checkpoint(hf_dir, tmp_path / "flat")
    scanned = checkpoints.load_model(tmp_path / "scan")
    flat = checkpoints.load_model(tmp_path / "flat")
    assert scanned.cfg.scan_layers and not flat.cfg.scan_layers
    tok = jnp.array([[1, 5, 6, 7, 8, 9]])
    args = (tok, jnp.zeros_like(tok), jnp.arange(6)[None], jnp.ones_like(tok))
    np.testing.assert_allclose(scanned(*args)[0], flat(*args)[0], rtol=1e-5, atol=1e-5)
    checkpoint_to_hf(tmp_path / "scan", tmp_path / "back", max_shard_bytes=200_000)
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert_bit_identical(tensors(hf_dir), tensors(tmp_path / "back"))


def test_pickled_weights_are_refused(hf_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*safetensors"):
        hf_to_checkpoint(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_tensors_are_listed_and_nothing_is_written(hf_dir, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for f in ("config.json", "generation_config.json"):
        (d / f).write_text((hf_dir / f).read_text())
    t = load_file(str(hf_dir / "model.safetensors"))
    del t["model.language_model.norm.weight"]
    t["model.extra.weight"] = np.zeros((3,), np.float32)
    t["lm_head.weight"] = t["lm_head.weight"][:, :10].copy()
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        hf_to_checkpoint(d, tmp_path / "out")
    msg = str(e.value)
    assert "missing tensors (1)" in msg and "model.language_model.norm.weight" in msg
    assert "unknown tensors (1)" in msg and "model.extra.weight (3,)" in msg
    assert "mis-shaped or invalid tensors (1)" in msg and "lm_head.weight" in msg
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # no output, no partial directory


def test_local_encoder_is_not_exported(tmp_path):
    """`model.vq.local_encoder` has no transformers equivalent: the export refuses it, naming the
    key, and writes nothing."""
    cfg = preset("tiny", text={"num_layers": 1}, vq={"local_encoder": True})
    checkpoints.save_model(tmp_path / "ckpt", Janus(cfg, rngs=nnx.Rngs(0)))
    assert checkpoints.read_config(tmp_path / "ckpt").vq.local_encoder
    with pytest.raises(ConversionError, match="model.vq.local_encoder=True"):
        checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_both_directions(hf_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "unijax.convert", *a], cwd=REPO, env=env,
                                    capture_output=True, text=True)
    r = run("--hf_dir", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "orbax" not in r.stderr.lower(), r.stderr[:500]  # absl logging at WARNING unless --verbosity
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text())["param_dtype"] == "bfloat16"
    r = run("--to_hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    with safe_open(tmp_path / "back" / "model.safetensors", framework="np") as f:
        assert f.get_tensor("lm_head.weight").dtype.name == "bfloat16"
    r = run("--hf_dir", str(hf_dir), "--out", str(tmp_path / "ckpt"))
    assert r.returncode != 0 and "already exists" in r.stderr


def test_hostile_weight_files_give_one_line_naming_the_file(hf_dir, tmp_path):
    """Junk or an absurd declared header, truncated data, a truncated config.json, integer and NaN
    tensors: each a ValueError naming the file (or tensor), nothing written. An existing --out is
    refused before any weight is read."""
    import shutil
    import struct

    good = (hf_dir / "model.safetensors").read_bytes()

    def variant(name, weights=None, config=None):
        d = tmp_path / name
        shutil.copytree(hf_dir, d)
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        if config is not None:
            (d / "config.json").write_text(config)
        return d

    cases = [
        (variant("junk", b"\x00" * 64), "model.safetensors: not a readable safetensors file"),
        (variant("huge_header", struct.pack("<Q", 1 << 60) + b"{}"), "model.safetensors: not a readable safetensors"),
        (variant("truncated", good[: len(good) // 2]), "model.safetensors"),
        (variant("config", config=(hf_dir / "config.json").read_text()[:100]), "config.json: not valid JSON"),
    ]
    t = load_file(str(hf_dir / "model.safetensors"))
    t["lm_head.weight"] = t["lm_head.weight"].astype(np.int32)
    t["model.language_model.norm.weight"] = np.full_like(t["model.language_model.norm.weight"], np.nan)
    d = variant("dtypes")
    save_file(t, str(d / "model.safetensors"))
    cases.append((d, r"(?s)(?=.*lm_head.weight: dtype int32)(?=.*model.language_model.norm.weight: holds NaN)"))
    for d, message in cases:
        with pytest.raises(ValueError, match=message):
            hf_to_checkpoint(d, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists(), d.name
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        hf_to_checkpoint(tmp_path / "junk", tmp_path / "exists")  # refused before the junk is read
