"""The training loop: resume exactness, SIGKILL recovery, sharded == unsharded, config errors."""

import dataclasses
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import envs
import jax
import numpy as np
import pytest

from configs import base, stage0_vq
from unijax.training import loop
from unijax.training.hooks import window_mean

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(workdir, data_dir, **train):
    c = base.get_config()
    c.workdir = str(workdir)
    c.data.dir = str(data_dir)
    c.data.update(envs.SHORT_ROWS)
    c.mesh.data = 1
    c.vision_pretrain.steps = 0  # tests/test_vision_pretrain.py covers the vision phase
    c.adaptor_warmup.steps = 0   # and the adaptor warm-up that follows it
    c.train.update(steps=6, batch_size=4, log_every=1, checkpoint_every=3, eval_every=1000, eval_batches=1,
                   warmup_steps=2, async_checkpointing=False)
    c.train.update(**train)
    return c


def losses_of(workdir):
    rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["loss_text"], r["loss_image"]) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted 6-step run on one device."""
    wd = tmp_path_factory.mktemp("ref")
    loop.train(tiny_config(wd, data_dir), devices=jax.devices()[:1])
    return losses_of(wd)


def test_resume_gives_the_same_losses(tmp_path, data_dir, reference):
    loop.train(tiny_config(tmp_path, data_dir, steps=3), devices=jax.devices()[:1])
    assert sorted(losses_of(tmp_path)) == [1, 2, 3]
    loop.train(tiny_config(tmp_path, data_dir), devices=jax.devices()[:1])  # same workdir: resumes at 3
    got = losses_of(tmp_path)
    for step in range(1, 7):
        assert got[step] == reference[step], step  # exactly: same data order, same state
    assert (tmp_path / "model" / "model.json").is_file()


def test_sharded_mesh_matches_one_device(tmp_path, data_dir, reference):
    """data=2 x fsdp=2 on 4 devices vs 1 device: float32 tolerance (rtol 1e-4 after 6 Adam steps)."""
    c = tiny_config(tmp_path, data_dir)
    c.mesh.update(data=2, fsdp=2)
    loop.train(c, devices=jax.devices()[:4])
    got = losses_of(tmp_path)
    for step in range(1, 7):
        np.testing.assert_allclose(got[step], reference[step], rtol=1e-4, err_msg=f"step {step}")


def _cli(args, workdir, data_dir, **popen):
    env = envs.cli_env()
    cmd = [sys.executable, "-m", "unijax.train", "--config", str(REPO / "configs/base.py"),
           f"--config.workdir={workdir}", f"--config.data.dir={data_dir}", "--config.train.batch_size=4",
           "--config.train.log_every=1", "--config.train.eval_every=1000", "--config.train.warmup_steps=2",
           *envs.SHORT_ROWS_FLAGS, "--config.vision_pretrain.steps=0",
           "--config.init_recipe=", *args]  # a fresh model: no stage-0 prerequisite
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.mark.slow
def test_sigkill_between_checkpoints_resumes_from_the_last(tmp_path, data_dir, reference):
    args = ["--config.train.steps=6", "--config.train.checkpoint_every=3"]
    proc = _cli(args + ["--config.train.steps=400"], tmp_path, data_dir)  # long run: killed at step >= 4
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4 and (tmp_path / "checkpoints/3").exists():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) >= 4
    metrics.unlink()  # the resumed run re-logs steps 4.. from checkpoint 3
    out, _ = _cli(args, tmp_path, data_dir).communicate(timeout=600)
    assert "resumed from" in out and "at step 3" in out, out
    got = losses_of(tmp_path)
    for step in (4, 5, 6):
        np.testing.assert_allclose(got[step], reference[step], rtol=1e-6, err_msg=out)


@pytest.mark.parametrize("arg, message", [
    ("--config.train.stpes=3", "stpes"),
    ("--config.train.steps=ten", "steps"),
    ("--config.mesh.data=3", "mesh.data=3"),
    ("--config.model.text.num_layers=two", "num_layers"),
])
def test_config_mistakes_fail_before_compiling(tmp_path, data_dir, arg, message):
    out, _ = _cli([arg], tmp_path, data_dir).communicate(timeout=120)
    assert message in out, out
    assert not (tmp_path / "checkpoints").exists()


def test_non_finite_loss_names_the_step_and_checkpoint(tmp_path, data_dir):
    c = tiny_config(tmp_path, data_dir, steps=8, learning_rate=1e4, warmup_steps=1, grad_clip=1e9)
    c.loss.text_weight = 1e30
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss .* at step \d+; last good checkpoint"):
        loop.train(c, devices=jax.devices()[:1])


def test_window_mean_weights_task_losses_by_tokens_and_drops_a_task_with_none():
    """Logged task losses are token-weighted over the logging window (float64 reference, 1e-12); a
    task with no tokens in the window (understanding-only runs: no image tokens) is left out, not nan."""
    window = [dict(loss=1.0, loss_text=2.0, text_tokens=10.0, loss_image=5.0, image_tokens=0.0),
              dict(loss=3.0, loss_text=4.0, text_tokens=30.0, loss_image=7.0, image_tokens=0.0)]
    out = window_mean(window)
    np.testing.assert_allclose(out["loss_text"], (2.0 * 10 + 4.0 * 30) / 40, rtol=1e-12)
    np.testing.assert_allclose(out["loss"], 2.0, rtol=1e-12)
    assert "loss_image" not in out and out["image_tokens"] == 0.0
    window[1]["image_tokens"] = 4.0
    np.testing.assert_allclose(window_mean(window)["loss_image"], 7.0, rtol=1e-12)


def test_stage0_vq_config_runs(tmp_path, data_dir):
    c = stage0_vq.get_config()
    c.workdir, c.data.dir, c.mesh.data = str(tmp_path), str(data_dir), 1
    c.train.update(steps=2, batch_size=4, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2)
    m = loop.train(c, devices=jax.devices()[:1])
    assert np.isfinite(m["loss"]) and 0 <= m["eval/detector_match"] <= 1


def _files_world(root, bad_index=None):
    """A LLaVA JSON + caption JSONL made of shapes scenes; record `bad_index` of the JSON lacks its image."""
    from PIL import Image

    from unijax.data import shapes

    (root / "img").mkdir()
    convs, caps = [], []
    rng = np.random.default_rng(0)
    for i in range(6):
        scene = shapes.scene_at(0, i)
        Image.fromarray(shapes.render(scene)).save(root / "img" / f"{i}.png")
        qa = shapes.sample_question(scene, rng)
        image = f"img/{i}.png" if i != bad_index else "img/missing.png"
        convs.append({"id": i, "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + qa.question}, {"from": "gpt", "value": qa.answer}]})
        caps.append(json.dumps({"image": f"img/{i}.png", "caption": shapes.t2i_prompt(scene, rng)[0]}))
    (root / "mmu.json").write_text(json.dumps(convs))
    (root / "t2i.jsonl").write_text("\n".join(caps) + "\n")


def _files_config(tmp_path, data_dir, **data):
    c = tiny_config(tmp_path / "run", data_dir, steps=3, checkpoint_every=3)
    c.data.update(source="files", mmu_json=str(tmp_path / "mmu.json"), mmu_image_root=str(tmp_path),
                  t2i_jsonl=str(tmp_path / "t2i.jsonl"), t2i_image_root=str(tmp_path))
    c.data.update(**data)
    return c


def test_bad_record_stops_the_run_naming_file_and_index(tmp_path, data_dir):
    _files_world(tmp_path, bad_index=2)
    with pytest.raises(ValueError, match=r"mmu\.json: record 2: image 'img/missing.png' not found"):
        loop.train(_files_config(tmp_path, data_dir, skip_bad_records=False), devices=jax.devices()[:1])
    assert not (tmp_path / "run" / "checkpoints" / "3").exists()


def test_bad_records_are_skipped_and_counted(tmp_path, data_dir, capsys):
    _files_world(tmp_path, bad_index=2)
    m = loop.train(_files_config(tmp_path, data_dir, skip_bad_records=True), devices=jax.devices()[:1])
    # 3 steps x 4 rows of a 1:1 mix = 6 MMU samples: one full epoch of the 6 records, one of them bad
    assert m["skipped_records"] == 1 and np.isfinite(m["loss"])
    # twice the epochs: the bad record comes back, and is still one record (its visits counted apart)
    c = _files_config(tmp_path, data_dir, skip_bad_records=True)
    c.workdir, c.train.steps, c.train.checkpoint_every = str(tmp_path / "run2"), 6, 6
    m = loop.train(c, devices=jax.devices()[:1])
    assert m["skipped_records"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run2" / "skipped.jsonl").read_text().splitlines()]
    assert [(pathlib.Path(r["source"]).name, r["index"], r["split"], r["why"]) for r in rows] == [
        ("mmu.json", 2, "train", "bad_record")] and "img/missing.png" in rows[0]["reason"] and rows[0]["visits"] == 2
    out = capsys.readouterr().out
    assert "skipped 1 train records: 1 x image _ not found under" in out and "skipped.jsonl" in out


def test_a_bad_held_out_record_is_counted_apart_once(tmp_path, data_dir, capsys):
    """The held-out end of the conversations (data.eval_split) holds the bad record: the evaluator's
    batches repeat it, yet it is one held-out skip, not a training one."""
    _files_world(tmp_path, bad_index=5)
    c = _files_config(tmp_path, data_dir, skip_bad_records=True, eval_split=0.2)
    c.train.update(eval_every=3, eval_batches=2)
    c.eval.evaluators = ("files_heldout",)
    m = loop.train(c, devices=jax.devices()[:1])
    assert m["heldout/skipped_records"] == 1 and m["skipped_records"] == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["index"], r["split"]) for r in rows] == [(5, "heldout")] and rows[0]["visits"] >= 1
    assert "skipped 1 heldout records" in capsys.readouterr().out


def test_user_data_formats_train_with_overflow_and_text_only_counted(tmp_path, data_dir):
    """JSONL conversations with text-only records and one conversation too long for max_len (skipped
    and counted by default; `truncate` keeps its first turn; `error` names it), plus captions from a
    parquet file mixed with the JSONL by per-file weights, a two-image conversation (data.max_images=2):
    the run trains on all of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _files_world(tmp_path)
    convs = json.loads((tmp_path / "mmu.json").read_text())
    convs[1] = {"id": "text", "conversations": [{"from": "human", "value": "what is a circle?"},
                                                {"from": "gpt", "value": "a round shape"}]}
    long_turns = [{"from": f, "value": v} for _ in range(40) for f, v in (("human", "what colour is it?"),
                                                                          ("gpt", "red"))]
    convs[3] = {**convs[3], "conversations": convs[3]["conversations"] + long_turns}
    convs[4] = {"image": ["img/4.png", "img/5.png"], "conversations": [  # two images, at their marks
        {"from": "human", "value": "<image>\nand\n<image>\nhow many objects in all?"}, {"from": "gpt", "value": "4"}]}
    (tmp_path / "mmu.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    caps = [json.loads(line) for line in (tmp_path / "t2i.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"image": [{"bytes": (tmp_path / c["image"]).read_bytes(), "path": None} for c in caps],
                             "caption": [c["caption"] for c in caps]}), tmp_path / "t2i.parquet", row_group_size=4)

    def config(**data):
        c = _files_config(tmp_path, data_dir, mmu_json=str(tmp_path / "mmu.jsonl"), max_images=2,
                          t2i_jsonl=f"{tmp_path / 't2i.jsonl'},{tmp_path / 't2i.parquet'}", t2i_weights="1,3", **data)
        c.train.steps = 4  # 8 MMU samples: every record of the 6 once
        c.data.max_len = 180  # the two-image conversation: 2 x 64 image slots + text
        return c

    m = loop.train(config(), devices=jax.devices()[:1])
    assert m["overflow_skipped"] >= 1 and m["skipped_records"] == 0 and np.isfinite(m["loss"])
    shutil.rmtree(tmp_path / "run")
    # the files_heldout evaluator on the held-out end of each file (which training then leaves out)
    from unijax.data import datasets

    c = config(eval_split=0.34)
    train_sets, _ = datasets.task_datasets(c.data, 32, 0)
    held, _ = datasets.task_datasets(c.data, 32, 0, part="heldout")
    trained = {train_sets[0][i]["index"] for i in range(40) if "index" in train_sets[0][i]}
    assert trained == {0, 1, 2, 3} and held[0][0]["index"] in (4, 5)  # 2 of 6 conversations held out
    c.train.eval_every = 2
    loop.train(c, devices=jax.devices()[:1])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    held_rows = [r for r in rows if "heldout/accuracy" in r]
    assert [r["step"] for r in held_rows] == [2, 4]
    assert all(np.isfinite(r["heldout/loss_text"]) and np.isfinite(r["heldout/loss_image"]) for r in held_rows)
    shutil.rmtree(tmp_path / "run")
    m = loop.train(config(overflow="truncate"), devices=jax.devices()[:1])
    assert m["overflow_skipped"] == 0 and np.isfinite(m["loss"])
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(ValueError, match=r"mmu\.jsonl: record 3: \d+ tokens do not fit data.max_len=180"):
        loop.train(config(overflow="error"), devices=jax.devices()[:1])


@pytest.mark.slow
def test_ta_moe_run_learns_the_task_router(tmp_path, data_dir):
    """configs/ta_moe.py (every FFN a TA-MoE layer) at batch 16 for 40 steps on a (data=1, expert=2)
    mesh: L_group falls below 1/4 of its first value and the held-out task-router accuracy of every
    layer exceeds 0.95; both task losses fall."""
    c = tiny_config(tmp_path, data_dir, steps=40, batch_size=16, log_every=10, checkpoint_every=40,
                    eval_every=40, eval_batches=2, warmup_steps=5)
    c.model.ffn = "ta_moe"
    c.mesh.update(data=1, expert=2)
    final = loop.train(c, devices=jax.devices()[:2])
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss_group" in r]
    first, last = train_rows[0], train_rows[-1]
    print({k: (first[k], last[k]) for k in ("loss_group", "loss_text", "loss_image", "router_acc")})
    assert last["loss_group"] < 0.25 * first["loss_group"]
    assert last["loss_text"] < first["loss_text"] and last["loss_image"] < first["loss_image"]
    layers = [final[f"eval/router_acc/layer{i}"] for i in range(4)]
    assert min(layers) > 0.95, layers
    assert 0 <= last["dropped_frac"] < 0.1


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tmp_path, data_dir):
    """A real SIGTERM (preemption): the CLI finishes its step, writes a checkpoint at that step, exits 0;
    rerunning the same command resumes there."""
    args = ["--config.train.steps=400", "--config.train.checkpoint_every=100"]
    proc = _cli(args, tmp_path, data_dir)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    step = max(losses_of(tmp_path))
    assert "SIGTERM: stopped after step" in out and (tmp_path / "checkpoints" / str(step)).is_dir(), out
    assert not (tmp_path / "model").exists()  # no export: the run is not finished
    out, _ = _cli([f"--config.train.steps={step + 1}", "--config.train.checkpoint_every=100"], tmp_path,
                  data_dir).communicate(timeout=600)
    assert f"at step {step}" in out and (tmp_path / "model").is_dir(), out


def test_mesh_fit_shrinks_fixed_sizes_to_the_devices_present_and_errors_name_the_key():
    from unijax.sharding import mesh_shape

    recipe = {"data": -1, "fsdp": 8, "fit": True}  # configs/janus_pro: a node of 8, data across nodes
    assert mesh_shape(recipe, 64) == {"data": 8, "fsdp": 8, "expert": 1, "tensor": 1}
    assert mesh_shape(recipe, 8) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert mesh_shape(recipe, 2) == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 1}
    assert mesh_shape(recipe, 12) == {"data": 3, "fsdp": 4, "expert": 1, "tensor": 1}
    assert mesh_shape({"data": -1, "expert": 8, "fit": True}, 1) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    assert mesh_shape({"data": 2, "fsdp": 4, "fit": True}, 16) == {"data": 4, "fsdp": 4, "expert": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"mesh.data=-1: the other mesh axes \(mesh.fsdp=8: 8 devices\) do not divide "
                                         r"the 2 devices present.*--config.mesh.fsdp=1\) or --config.mesh.fit=True"):
        mesh_shape({"data": -1, "fsdp": 8}, 2)


def test_init_from_of_another_architecture_names_each_differing_key(tmp_path, data_dir):
    from flax import nnx

    from unijax import checkpoints
    from unijax.models import family
    from unijax.training.config import model_config

    c = tiny_config(tmp_path / "run", data_dir)
    cfg = model_config(c)
    other = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=cfg.text.num_layers + 1))
    checkpoints.save_model(tmp_path / "other", family.build(other, nnx.Rngs(0)))
    c.init_from = str(tmp_path / "other")
    with pytest.raises(ValueError) as e:
        loop.initial_model(cfg, c, loop.MetricLogger(tmp_path / "run", 1))
    n = cfg.text.num_layers
    assert f"model.text.num_layers: {n + 1} (checkpoint) != {n} (this run)" in str(e.value)
    assert "JanusConfig(" not in str(e.value) and "model.preset=checkpoint" in str(e.value)
    # the recipes' default: the checkpoint's architecture once it exists, the preset before
    c.model.preset_from_checkpoint = True
    assert model_config(c).text.num_layers == n + 1
    c.init_from = str(tmp_path / "not_converted_yet")
    assert model_config(c).text.num_layers == n


def test_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path, data_dir):
    """A workdir held by one run (here: this process) refuses a second `train` at once: one line, exit
    2, the holder's process id named, nothing written. The lock goes with its holder."""
    import os

    from unijax.io import WorkdirBusyError, directory_lock

    with directory_lock(tmp_path):
        out, _ = _cli(["--config.train.steps=2"], tmp_path, data_dir).communicate(timeout=300)
        assert f"is in use by process {os.getpid()}" in out and "Traceback" not in out, out
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
        with pytest.raises(WorkdirBusyError, match="choose another train.workdir"):
            with directory_lock(tmp_path):
                pass
    with directory_lock(tmp_path):  # released
        pass


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """Step 4's state files truncated: restore says so, moves it to checkpoints.damaged/4 and restores
    step 2 (its state and its data iterator's position); with every step damaged it is one error."""
    import grain

    from unijax.training import checkpointing

    config = base.get_config()
    config.train.async_checkpointing = False
    ckpts = checkpointing.TrainCheckpoints(tmp_path / "checkpoints", config)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in (2, 4):
        next(it)
        ckpts.save(step, {"step": np.asarray(step, np.int32), "w": np.full((64,), step, np.float32)}, it)
    for f in [p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.stat().st_size > 16]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
    state = ckpts.restore({"step": np.asarray(0, np.int32), "w": np.zeros((64,), np.float32)}, fresh)
    assert int(state["step"]) == 2 and float(state["w"][0]) == 2.0 and next(fresh) == 1
    assert (tmp_path / "checkpoints.damaged" / "4").is_dir() and ckpts.latest_step() == 2
    for f in [p for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*") if p.is_file() and p.stat().st_size > 16]:
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoints: no checkpoint can be restored \(all of \[2\] are damaged"):
        ckpts.restore({"step": np.asarray(0, np.int32), "w": np.zeros((64,), np.float32)},
                      iter(grain.MapDataset.range(9).to_iter_dataset()))
    ckpts.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_a_disk_that_fills_during_a_save_is_one_line(tmp_path, monkeypatch, caplog, async_save):
    """The pre-check passed but the disk fills while Orbax writes (tensorstore's own ENOSPC error,
    raised in Orbax's background threads): one error naming the directory and the intact previous
    step, none of Orbax's thread tracebacks in the log, no partial step left, the previous one
    restores."""
    import grain
    import orbax.checkpoint._src.serialization.type_handlers as th

    from unijax.training import checkpointing

    c = base.get_config()
    c.train.async_checkpointing = async_save
    ckpts = checkpointing.TrainCheckpoints(tmp_path / "checkpoints", c)
    data = iter(grain.MapDataset.range(9).to_iter_dataset())
    state = {"w": np.arange(64, dtype=np.float32)}
    ckpts.save(1, state, data)
    ckpts.wait()

    async def full(self, value, tspec, ts_context):  # the message tensorstore gives on a full tmpfs
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{tmp_path}/": '
                         "Failed to write 840593 bytes to file 11: No space left on device [os_error_code='28']")

    monkeypatch.setattr(th.NumpyHandler, "_open_and_write", full)
    with pytest.raises(ValueError, match=r"^\S+/checkpoints: a checkpoint write ran out of disk space \(the last "
                                         r"complete checkpoint, 1, is intact\); free some space"):
        ckpts.save(2, {"w": state["w"] + 1}, data)
        ckpts.wait()
    assert not [r for r in caplog.records if r.exc_info or "No space left" in r.getMessage()]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    monkeypatch.undo()
    restored = checkpointing.TrainCheckpoints(tmp_path / "checkpoints", c).restore(
        {"w": np.zeros(64, np.float32)}, iter(grain.MapDataset.range(9).to_iter_dataset()))
    np.testing.assert_array_equal(restored["w"], state["w"])
    ckpts.close()


def test_a_full_disk_stops_the_run_in_one_line_before_writing(tmp_path, monkeypatch):
    """Less free space than the state's bytes: the save is refused before Orbax writes anything (no
    partial step directory), naming the directory, the space free and the space needed."""
    import collections

    from unijax.training import checkpointing

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    ckpts = checkpointing.TrainCheckpoints(tmp_path / "checkpoints", base.get_config())
    state = {"params": np.zeros((1 << 19,), np.float32)}  # 2 MiB
    with pytest.raises(ValueError, match=r"checkpoints: 1.0 MiB free, a checkpoint of this run needs about 2.0 MiB"):
        ckpts.save(1, state, data_iter=None)
    ckpts.close()
    assert not any((tmp_path / "checkpoints").iterdir())
