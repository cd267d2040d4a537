"""`python -m unijax.plan`: the training loop's own step compiled for a mesh with abstract
parameters. Per-device bytes are checked against what replication and sharding must give, the
model FLOPs against the partitioned program's own count, and the CLI in a fresh process that
creates its fake devices."""

import json
import os
import pathlib
import subprocess
import sys

import envs
import numpy as np
import pytest

from configs import base, stage2
from unijax import checkpoints
from unijax import plan as planner
from unijax.training.loop import model_config
from unijax.training.params import count

REPO = pathlib.Path(__file__).resolve().parents[1]


def small(config_module=base, **model):
    c = config_module.get_config()
    c.model.text.num_layers = 2
    c.model.update(**model)
    c.train.batch_size = 8
    return c


@pytest.fixture(scope="module")
def replicated():
    return planner.plan(small(), dict(data=4))


def test_data_parallel_holds_every_parameter_on_every_device(replicated):
    """(data=4): nothing is sharded, so each device holds all parameters (float32) and two AdamW
    moments of the trainable ones."""
    p, b = replicated["parameters"], replicated["per_device_bytes"]
    frozen = p["total"] - p["trainable"]
    assert b["trainable_params"] == 4 * p["trainable"] and b["frozen_params"] == 4 * frozen
    assert b["optimizer_state"] >= 2 * 4 * p["trainable"]
    resident = b["trainable_params"] + b["lora_adapters"] + b["frozen_params"] + b["optimizer_state"] + b["batch"]
    assert b["resident"] == resident and b["peak"] == resident + b["outputs_not_aliased"] + b["temporaries"]
    assert 0 < b["xla_arguments"] <= resident  # what the step reads (unused frozen weights are pruned)
    assert replicated["fits"] and replicated["mesh"] == dict(data=4, fsdp=1, expert=1, tensor=1)


def test_fsdp_splits_parameters_and_model_flops_match_the_partitioned_program(replicated):
    r = planner.plan(small(), dict(fsdp=4), step_time=0.5)
    b, b1 = r["per_device_bytes"], replicated["per_device_bytes"]
    assert b["trainable_params"] < 0.4 * b1["trainable_params"]  # most matrices split 4 ways over `embed`
    assert b["optimizer_state"] < 0.4 * b1["optimizer_state"]
    # the step's math does not depend on the mesh; one device runs 1/4 of it (XLA's count of the
    # partitioned program: within 10%, collectives and per-shard bookkeeping differ)
    assert r["flops_per_step"] == pytest.approx(replicated["flops_per_step"], rel=1e-6)
    np.testing.assert_allclose(r["compiled_flops_per_device"], r["flops_per_step"] / 4, rtol=0.1)
    assert r["mfu"] == pytest.approx(r["flops_per_step_per_device"] / (0.5 * planner.PEAK_TFLOPS["h100"] * 1e12))


def test_scanned_layers_count_every_layer():
    """XLA's cost analysis counts a while loop's body once: the plan counts the unscanned step."""
    flat = planner.plan(small(stage2), dict(data=2, expert=2))
    scanned = planner.plan(small(stage2, scan_layers=True), dict(data=2, expert=2))
    assert scanned["flops_per_step"] == pytest.approx(flat["flops_per_step"], rel=1e-6)
    assert scanned["compiled_flops_per_device"] < 0.8 * flat["compiled_flops_per_device"]
    assert flat["parameters"]["lora"] > 0 and flat["per_device_bytes"]["lora_adapters"] > 0
    model = checkpoints.abstract_model(model_config(small(stage2)))
    assert flat["parameters"]["total"] == count(checkpoints.flat_params(model)) + flat["parameters"]["lora"]


@pytest.mark.parametrize("mesh, override, message", [
    (dict(data=3), {}, "train.batch_size=8"),
    (dict(data=2), {"data.max_len": 40}, "data.max_len=40"),
    (dict(data=4096), {}, "4096 devices"),
])
def test_bad_plans_are_refused_before_compiling(mesh, override, message):
    c = small()
    for k, v in override.items():
        section, key = k.split(".")
        c[section][key] = v
    with pytest.raises(ValueError, match=message):
        planner.plan(c, mesh)


def test_parse_mesh_names_the_flag():
    assert planner.parse_mesh("data=8,fsdp=8") == {"data": 8, "fsdp": 8}
    with pytest.raises(ValueError, match="--mesh 'pipeline=2'"):
        planner.parse_mesh("pipeline=2")


def test_cli_creates_its_fake_devices_and_writes_json(tmp_path):
    env = dict(os.environ, XLA_FLAGS=envs.xla_flags())  # no device count: the CLI must create its own
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "unijax.plan", "--config", str(REPO / "configs/base.py"),
                           "--config.model.text.num_layers=1", "--config.train.batch_size=6",
                           "--mesh", "data=3,tensor=2", "--chip", "tpu_v5p", "--json", str(out)],
                          cwd=REPO, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["mesh"] == dict(data=3, fsdp=1, expert=1, tensor=2) and r["devices"].startswith("6 x cpu")
    assert r["memory_gb"] == planner.MEMORY_GB["tpu_v5p"]
    assert "fits in 95 GB per device: yes" in proc.stdout and "model FLOPs per step" in proc.stdout


@pytest.mark.parametrize("stage,arg", [("dpo_und", "1b"), ("dpo_gen", "7b+full")])
def test_janus_pro_dpo_configs_plan_and_count_the_reference(stage, arg):
    """The DPO configs compile on a fsdp mesh (at the tiny preset's size, two layers): with LoRA the
    reference is the adapters-off model (no copy), with `+full` a frozen copy of the decoder that
    plan counts."""
    import importlib

    c = importlib.import_module(f"configs.janus_pro.{stage}").get_config(arg)
    assert c.train.objective == "dpo" and c.model.preset == {"1b": "janus_pro_1b", "7b": "janus_pro_7b"}[arg[:2]]
    c.model.preset = "tiny"
    c.model.text.num_layers = 2
    c.train.batch_size = 4
    c.data.max_len = 128
    r = planner.plan(c, dict(fsdp=4))
    ref = r["per_device_bytes"]["reference_params"]
    if arg.endswith("full"):  # the decoder's starting weights in bf16, sharded 4 ways like the trained ones
        assert ref > 0 and ref == pytest.approx(r["per_device_bytes"]["trainable_params"] / 2, rel=0.05)
    else:
        assert ref == 0 and r["per_device_bytes"]["lora_adapters"] > 0
    assert r["per_device_bytes"]["peak"] > 0 and r["flops_per_step"] > 0


@pytest.mark.parametrize("stage,arg", [("stage1_und", "1b"), ("stage1_gen", "7b"), ("stage2", "7b+aia")])
def test_janus_pro_recipe_configs_plan(stage, arg):
    """The recipe configs (configs/janus_pro) build for 1B and 7B, validate, and their train step
    compiles on a fsdp mesh; here at the tiny preset's size (the 64-device plans of the real sizes
    are the table in docs/finetune_janus_pro.md)."""
    import importlib

    module = importlib.import_module(f"configs.janus_pro.{stage}")
    c = module.get_config(arg)
    assert c.model.preset == {"1b": "janus_pro_1b", "7b": "janus_pro_7b"}[arg[:2]] and c.data.tokenizer == "checkpoint"
    assert c.model.scan_layers and c.model.dtype == "bfloat16" and c.vision_pretrain.steps == 0
    assert (c.loss.aia_weight > 0) == arg.endswith("aia")
    c.model.preset = "tiny"
    c.train.batch_size = 4
    c.data.max_len = 160
    r = planner.plan(c, dict(fsdp=4))
    assert r["per_device_bytes"]["peak"] > 0 and r["flops_per_step"] > 0
