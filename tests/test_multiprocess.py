"""Real multi-process training on this machine: 2 processes x 2 CPU devices (gloo collectives,
`jax.distributed.initialize` through the train CLI's environment contract, unijax/distributed.py)
train the tiny TA-MoE model on a (data=2, expert=2) mesh with per-process data shards; their
losses equal a 1-process 4-device run (capacity large enough that no token is dropped: process
shards interleave the rows, so dispatch groups hold other tokens than in one process and capacity
drops would differ), and the checkpoint they write together restores in a
1-process run that continues with the same loss."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import envs
import numpy as np
import pytest

from unijax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                    "JAX_PROCESS_ID", "UNIJAX_DISTRIBUTED"))}
    return dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=envs.xla_flags(devices), **extra)


def _cmd(workdir, data_dir, steps):
    return [sys.executable, "-m", "unijax.train", "--config", str(REPO / "configs/ta_moe.py"),
            f"--config.workdir={workdir}", f"--config.data.dir={data_dir}", f"--config.train.steps={steps}",
            "--config.train.batch_size=8", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
            "--config.train.eval_every=1000", "--config.train.eval_batches=1", "--config.train.warmup_steps=1",
            "--config.train.min_lr_ratio=1.0",  # constant after warm-up: the schedule does not depend on steps
            "--config.train.async_checkpointing=False", "--config.model.text.num_layers=2", "--config.init_recipe=",
            "--config.moe.num_experts_per_group=2", "--config.moe.capacity_factor=8",  # no drops: per-group
            "--config.mesh.data=2", "--config.mesh.expert=2",
            *envs.SHORT_ROWS_FLAGS, "--config.vision_pretrain.steps=0"]


def _losses(workdir):
    rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_environment_contract():
    assert distributed.wanted({"UNIJAX_DISTRIBUTED": "1"}) and distributed.wanted({"JAX_COORDINATOR_ADDRESS": "h:1"})
    assert distributed.wanted({"SLURM_NTASKS": "8"}) and distributed.wanted({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not distributed.wanted({}) and not distributed.wanted({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "a"})
    assert not distributed.wanted({"UNIJAX_DISTRIBUTED": "0", "SLURM_NTASKS": "8"})


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores(tmp_path):
    data_dir = REPO / "data"
    ref = subprocess.run(_cmd(tmp_path / "ref", data_dir, 4), cwd=REPO, env=_env(4), capture_output=True, text=True,
                         timeout=900)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(_cmd(tmp_path / "mp", data_dir, 3), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert "mesh {'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 1}" in outs[0] and "step 1/3" not in outs[1]  # only process 0 logs
    want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "mp")
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], rtol=1e-5)
    assert (tmp_path / "mp" / "model" / "model.json").is_file()

    shutil.copytree(tmp_path / "mp", tmp_path / "resume", ignore=shutil.ignore_patterns("model", "metrics.jsonl"))
    res = subprocess.run(_cmd(tmp_path / "resume", data_dir, 4), cwd=REPO, env=_env(4), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0 and "at step 3" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "resume")[4], want[4], rtol=1e-5)
