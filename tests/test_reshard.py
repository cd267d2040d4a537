"""Checkpoints outlive their mesh and their writer: a TA-MoE run checkpointed on (data=4) resumes on
(data=2, expert=2) and on (fsdp=4) with the losses of the uninterrupted run, and a process killed
while it writes a checkpoint leaves the previous one intact and restorable."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import envs
import jax
import numpy as np
import pytest

from configs import base
from unijax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]


def moe_config(workdir, data_dir, mesh, steps=6):
    c = base.get_config()
    c.workdir = str(workdir)
    c.data.dir = str(data_dir)
    c.data.update(envs.SHORT_ROWS)
    c.vision_pretrain.steps = 0
    c.model.ffn = "ta_moe"
    c.model.text.num_layers = 2
    c.moe.update(num_experts_per_group=2, capacity_factor=8.0)  # no token dropped on any mesh
    c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    c.mesh.update(**mesh)
    c.train.update(steps=steps, batch_size=8, log_every=1, checkpoint_every=3, keep_checkpoints=2, eval_every=1000,
                   eval_batches=1, warmup_steps=2, min_lr_ratio=1.0, async_checkpointing=False)
    return c


def losses_of(workdir):
    rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["loss_group"]) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def data4_run(tmp_path_factory, data_dir):
    """6 uninterrupted steps on (data=4), checkpoints at steps 3 and 6."""
    wd = tmp_path_factory.mktemp("data4")
    loop.train(moe_config(wd, data_dir, dict(data=4)), devices=jax.devices()[:4])
    return wd, losses_of(wd)


@pytest.mark.parametrize("mesh", [pytest.param(dict(data=2, expert=2), marks=pytest.mark.slow), dict(fsdp=4)],
                         ids=["data2_expert2", "fsdp4"])
def test_data4_checkpoint_resumes_on_another_mesh_with_the_same_losses(tmp_path, data_dir, data4_run, mesh):
    """Orbax restores the step-3 state onto the new mesh's shardings (experts split over `expert`,
    or every matrix over `fsdp`); steps 4-6 match the uninterrupted run (rtol 1e-4: float32
    reductions in another order)."""
    src, reference = data4_run
    wd = tmp_path / "run"
    shutil.copytree(src, wd)
    shutil.rmtree(wd / "checkpoints" / "6")
    shutil.rmtree(wd / "model")
    (wd / "metrics.jsonl").unlink()
    c = moe_config(wd, data_dir, mesh)
    loop.train(c, devices=jax.devices()[:4])
    got = losses_of(wd)
    assert sorted(got) == [4, 5, 6]  # resumed at the step-3 checkpoint: the data iterator continues at batch 4
    for step in (4, 5, 6):
        np.testing.assert_allclose(got[step], reference[step], rtol=1e-4, err_msg=f"step {step} on {mesh}")


_SAVER = textwrap.dedent("""
    import pathlib, sys
    import grain, jax.numpy as jnp
    from configs import base
    from unijax.training.checkpointing import TrainCheckpoints

    c = base.get_config()
    c.train.async_checkpointing = False
    ckpts = TrainCheckpoints(pathlib.Path(sys.argv[1]), c)
    it = iter(grain.MapDataset.range(10_000).to_iter_dataset())
    for step in range(1, 10_000):  # until killed; 256 MB per save, so the kill lands mid-save
        next(it)
        ckpts.save(step, {"w": jnp.full((64, 1024, 1024), float(step)), "step": jnp.int32(step)}, it)
        ckpts.wait()
        print("saved", step, flush=True)
""")


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL while a step is being written (Orbax's temporary directory exists, the step is not
    committed): the previous step is the latest, restores exactly with its data-iterator position,
    and saving again works."""
    import grain
    import jax.numpy as jnp

    from unijax.training.checkpointing import TrainCheckpoints

    d = tmp_path / "checkpoints"
    env = envs.cli_env(PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(d)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, killed_mid_save = time.time() + 120, None
    try:
        while time.time() < deadline and proc.poll() is None:
            partial = list(d.glob("*.orbax-checkpoint-tmp*")) if d.is_dir() else []
            if partial and (d / "2").is_dir():  # at least two committed steps, a third in flight
                proc.send_signal(signal.SIGKILL)
                killed_mid_save = partial[0].name.split(".")[0]
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        out = proc.communicate()[0]
    assert killed_mid_save is not None, out
    assert not (d / killed_mid_save).exists(), "the step in flight must not be committed"
    c = base.get_config()
    c.train.async_checkpointing = False
    ckpts = TrainCheckpoints(d, c)
    last = ckpts.latest_step()
    assert last == int(killed_mid_save) - 1, (last, killed_mid_save, sorted(p.name for p in d.iterdir()))
    it = iter(grain.MapDataset.range(10_000).to_iter_dataset())
    state = ckpts.restore({"w": jnp.zeros((64, 1024, 1024)), "step": jnp.int32(0)}, it)
    assert int(state["step"]) == last and float(jnp.min(state["w"])) == float(jnp.max(state["w"])) == last
    assert next(it) == last  # the iterator resumes after the `last` elements it had yielded
    ckpts.save(last + 1, {"w": jnp.zeros((64, 1024, 1024)), "step": jnp.int32(last + 1)}, it)
    ckpts.wait()
    assert ckpts.latest_step() == last + 1
    ckpts.close()
