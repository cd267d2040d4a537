"""The step loop never waits on the host between log steps: step metrics stay on the device and come
back in one fetch at a log step (or before a checkpoint / evaluation), where an injected NaN is
caught naming its step and the last good checkpoint, with nothing saved after it. The logged
throughput: the model FLOPs of a step against an analytic 6 N T + attention count, and MFU."""

import contextlib
import json

import envs
import jax
import jax.numpy as jnp
import pytest
from jax._src.array import ArrayImpl

from configs import base
from unijax import sharding
from unijax.data import pipeline
from unijax.training import hooks, loop, throughput
from unijax.training.config import model_config


def tiny_config(workdir, data_dir, **train):
    c = base.get_config()
    c.workdir, c.data.dir = str(workdir), str(data_dir)
    c.data.update(envs.SHORT_ROWS)
    c.mesh.data = 1
    c.vision_pretrain.steps = 0
    c.eval.evaluators = ()
    c.train.update(steps=8, batch_size=4, warmup_steps=2, eval_every=1000, async_checkpointing=False)
    c.train.update(**train)
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@contextlib.contextmanager
def built(config):
    """`loop.setup` on one device, torn down like `loop.train` does."""
    run = loop.setup(config, devices=jax.devices()[:1])
    stop = hooks.PreemptionFlag()
    try:
        with jax.set_mesh(run.mesh):
            yield run, stop
    finally:
        stop.restore()
        run.ckpts.close()
        run.data_iter.close()
        run.log.close()


def counting_steps(run, nan_at=None):
    """Wraps `run.train_step`: counts the calls in `calls[0]`; step `nan_at`'s loss becomes nan (on device)."""
    real, calls = run.train_step, [run.start]

    def train_step(state, frozen, batch):
        state, metrics = real(state, frozen, batch)
        calls[0] += 1
        if calls[0] == nan_at:
            metrics = dict(metrics, loss=metrics["loss"] * jnp.nan)
        return state, metrics

    run.train_step = train_step
    return calls


def tensorboard_scalars(workdir) -> dict[tuple[int, str], float]:
    """{(step, tag): value} from the run's TensorBoard event files (TFRecord framing: length, its CRC,
    an `Event` proto, its CRC), read with tensorboardX's own protos."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            n = int.from_bytes(data[i:i + 8], "little")
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out.update({(event.step, v.tag): v.simple_value for v in event.summary.value})
    return out


def logged_steps(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("log_every, checkpoint_every, nan_at, good", [
    (5, 2, 3, 2),  # caught by the fetch before step 4's checkpoint
    (3, 4, 5, 4),  # caught at log step 6 (checkpoint 8 never happens)
])
def test_injected_nan_stops_at_the_next_fetch_naming_step_and_checkpoint(tmp_path, data_dir, log_every,
                                                                           checkpoint_every, nan_at, good):
    c = tiny_config(tmp_path, data_dir, log_every=log_every, checkpoint_every=checkpoint_every)
    with built(c) as (run, stop):
        counting_steps(run, nan_at=nan_at)
        with pytest.raises(loop.NonFiniteLossError,
                           match=rf"non-finite loss nan at step {nan_at}; last good checkpoint: "
                                 rf"\S*checkpoints/{good} \(step {good}\)"):
            loop.loop(run, stop)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [good] and all(s < nan_at for s in saved), saved
    assert all(r["step"] < nan_at for r in logged_steps(tmp_path))


def test_metrics_reach_the_host_only_at_log_steps_with_throughput_and_mfu(tmp_path, data_dir, monkeypatch):
    """6 steps, log_every=3, no checkpoint before the last: one fetch of 3 steps' metrics at steps 3
    and 6, and no device array read on the host at any other step (every `jax.Array` -> numpy read
    goes through `ArrayImpl._value`). The log lines carry tokens/s per device, step time, model
    TFLOP/s per device and, with train.peak_tflops set, MFU = model FLOPs per device / step time / peak."""
    c = tiny_config(tmp_path, data_dir, steps=6, log_every=3, checkpoint_every=100, peak_tflops=100.0)
    with built(c) as (run, stop):
        calls = counting_steps(run)
        fetches, reads = [], set()
        real_to_host, real_value = hooks.to_host, ArrayImpl._value

        def to_host(tree):
            fetches.append((calls[0], len(tree)))
            return real_to_host(tree)

        def value(self):
            reads.add(calls[0])
            return real_value.fget(self)

        monkeypatch.setattr(hooks, "to_host", to_host)
        monkeypatch.setattr(ArrayImpl, "_value", property(value))
        final, preempted = loop.loop(run, stop)
        monkeypatch.undo()
    assert preempted is None and fetches == [(3, 3), (6, 3)]
    assert reads == {3, 6}, sorted(reads)  # the fetches (step 6 also writes the final checkpoint)
    rows = logged_steps(tmp_path)
    assert [r["step"] for r in rows] == [3, 6]
    flops_per_device = run.flops_per_step / run.mesh.size
    for r in rows:
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"]) and r["step_time_s"] > 0  # 1 device
        assert r["model_tflops_per_s_per_device"] == pytest.approx(flops_per_device / r["step_time_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s_per_device"] / 100.0)
    assert final["mfu"] == rows[-1]["mfu"]
    tb = tensorboard_scalars(tmp_path)  # TensorBoard holds the same scalars (float32) at the same steps
    for r in rows:
        for k in ("loss", "tokens_per_s", "mfu"):
            assert tb[(r["step"], k)] == pytest.approx(r[k], rel=1e-6), k
    # the loop's own step (lowered once, not compiled again) counts what the plan's abstract step does
    cfg = model_config(c)
    batch = throughput.abstract_batch(pipeline.Layout.for_data(cfg, c.data), 4, run.mesh)
    assert run.flops_per_step == pytest.approx(throughput.model_flops(c, cfg, run.mesh, batch), rel=1e-6)


def test_model_flops_match_6NT_plus_attention():
    """Long text rows (max_len 448), so the decoder dominates the count: XLA's model FLOPs of one step
    within 10% of 6 N T + 12 L H d_head S T (N: the decoder's non-embedding parameters and both
    heads; T = batch x max_len). The rest is the vision tower and the frozen VQ encoder on the row's
    image (about 170 MFLOP a row) and the norms, softmaxes and AdamW. Gradient accumulation (a scan
    over micro-batches, whose body XLA counts once) does not change the count."""
    c = tiny_config("/unused", "/unused", batch_size=8)
    c.data.max_len = 448
    cfg = model_config(c)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    batch = throughput.abstract_batch(pipeline.Layout.for_data(cfg, c.data), 8, mesh)
    flops = throughput.model_flops(c, cfg, mesh, batch)
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    decoder = t.num_layers * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)
    heads = t.hidden_size * t.vocab_size + (t.hidden_size * t.hidden_size + t.hidden_size * cfg.vq.num_embeddings)
    tokens, seq = 8 * 448, 448
    analytic = 6 * (decoder + heads) * tokens + 12 * t.num_layers * q * seq * tokens
    print(f"model FLOPs per step {flops / 1e9:.2f} G, analytic {analytic / 1e9:.2f} G")
    assert flops == pytest.approx(analytic, rel=0.1)
    c.train.grad_accum_steps = 2
    assert throughput.model_flops(c, cfg, mesh, batch) == pytest.approx(flops, rel=1e-6)


@pytest.mark.parametrize("kind, chip", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("TPU v4", "tpu_v4"), ("TPU v5 lite", "tpu_v5e"), ("TPU v5", "tpu_v5p"),
    ("TPU v6 lite", "tpu_v6e"), ("cpu", None), ("TPU v4 lite", None),
])
def test_device_kinds_name_their_peak(kind, chip):
    assert throughput.chip_of(kind) == chip
