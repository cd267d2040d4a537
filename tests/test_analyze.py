"""`python -m unijax.analyze experts`: TA-MoE routing statistics of a saved checkpoint.

A tiny TA-MoE model (3 decoder layers, TA-MoE on layers 0 and 2, 3 experts per group, routed by
the task router so that both tasks reach both groups) is saved, analysed in-process through the
CLI's `main`, and the statistics are checked against float64 numpy computed from the model's own
aux (`task_logits`, `load`).
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unijax import analyze, checkpoints, contract
from unijax.analysis import heldout
from unijax.analysis.experts import expert_stats
from unijax.models import forward
from unijax.models.family import preset
from unijax.models.janus import Janus

REPO = pathlib.Path(__file__).resolve().parents[1]
N, LAYERS, SEED = 3, (0, 2), 7


def quick_model(cfg, seed=0) -> Janus:
    """A Janus with N(0, 0.02) matrices, unit norm scales, zero biases and alpha = 1, filled in
    numpy: eager init compiles a truncated-normal kernel per VQ conv shape (~40 s on 2 CPU cores)."""
    model = checkpoints.abstract_model(cfg)
    rng = np.random.default_rng(seed)

    def fill(path, v):
        if len(v.shape) >= 2:
            x = (0.02 * rng.standard_normal(v.shape)).astype(v.dtype)
        else:
            x = np.full(v.shape, 0 if str(path[-1].key) == "bias" else 1, v.dtype)
        return jax.device_put(x, jax.devices()[0])  # committed, as load_model restores: one compile serves both

    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def tiny_moe():
    return preset("tiny", text={"num_layers": 3}, ffn="ta_moe",
                  moe={"num_experts_per_group": N, "top_k": 2, "group_assignment": "router", "layers": LAYERS})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """workdir/{model, config.json} as training leaves them; analysed with 2 batches of 4 rows."""
    workdir = tmp_path_factory.mktemp("ta_moe")
    model = quick_model(tiny_moe())
    checkpoints.save_model(workdir / "model", model)
    (workdir / "config.json").write_text(json.dumps({"seed": SEED, "data": {"dir": str(REPO / "data")},
                                                     "train": {"batch_size": 32, "eval_batches": 8}}))
    stats = analyze.main(["experts", "--ckpt", str(workdir / "model"), "--num_batches", "2", "--batch_size", "4"])
    return workdir, stats, model


def test_experts_json_fields(run):
    workdir = run[0]
    out = workdir / "analysis"                                      # the default: <ckpt>/../analysis
    stats = json.loads((out / "experts.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["experts.json", "experts.png"]  # no partial files
    assert stats["seed"] == SEED and stats["data_seed"] == SEED + 1_000_003          # run config read
    assert stats["num_batches"] == 2 and stats["batch_size"] == 4
    assert stats["moe_layers"] == list(LAYERS) and [r["layer"] for r in stats["layers"]] == list(LAYERS)
    assert stats["tokens"]["mmu"] > 0 and stats["tokens"]["t2i"] > 0
    for r in stats["layers"]:
        for key in ("router_acc", "router_prob"):
            assert all(0 <= r[key][t] <= 1 for t in ("mmu", "t2i", "all")), (r["layer"], key)
        assert 0 <= r["dropped_frac"] <= 1 and r["alpha"] == pytest.approx(1.0)
        for tokens in ("mmu_tokens", "t2i_tokens"):
            share = r["group_share"][tokens]
            assert share["mmu_group"] + share["t2i_group"] == pytest.approx(1, abs=1e-6)
            for group in ("mmu_group", "t2i_group"):
                load = r["expert_load"][group][tokens]
                assert len(load) == N and all(0 <= v <= 1 for v in load)
                # a group's loads sum to 1 for every task that sends it anything (all zero otherwise)
                assert sum(load) == pytest.approx(1 if share[group] > 0 else 0, abs=1e-5), (r["layer"], group)
        for group in ("mmu_group", "t2i_group"):
            assert 0 <= r["load_entropy"][group] <= 1 + 1e-9
        # routed by the task router's argmax: a task's share of its own group is the router's accuracy on it
        assert r["group_share"]["mmu_tokens"]["mmu_group"] == pytest.approx(r["router_acc"]["mmu"], abs=1e-9)
        assert r["group_share"]["t2i_tokens"]["t2i_group"] == pytest.approx(r["router_acc"]["t2i"], abs=1e-9)


def test_experts_png(run):
    workdir = run[0]
    png = workdir / "analysis" / "experts.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_router_stats_match_numpy_from_aux(run):
    """expert_stats on one batch vs float64 numpy from the same model's aux task_logits and load."""
    workdir = run[0]
    model = run[2]
    config, _ = heldout.run_config(workdir / "model")
    batches, ipr, _ = heldout.heldout_batches(model.cfg, config, 1, 4, SEED, str(REPO / "data"))
    batch = batches[0]
    stats = expert_stats(model, [batch], ipr)

    graphdef, state = nnx.split(model)
    keys = list(contract.BATCH_KEYS)  # the device batch ("kind" and the skipped-record names stay on the host)
    aux = jax.jit(lambda s, b: forward.lm_forward(nnx.merge(graphdef, s), b, ipr)[3])(state, {k: batch[k] for k in keys})
    logits = np.asarray(aux["task_logits"], np.float64)                          # [L, B, T, 2]
    task, valid = np.asarray(batch["task"]), np.asarray(batch["segment_ids"]) > 0
    pred = logits.argmax(-1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p_true = np.take_along_axis(p, np.broadcast_to(task, pred.shape)[..., None], -1)[..., 0]
    load = np.asarray(aux["load"], np.float64)                                   # [L, 2N]
    assert len(stats["layers"]) == logits.shape[0] == len(LAYERS)
    for i, r in enumerate(stats["layers"]):
        for name, sel in (("mmu", valid & (task == 0)), ("t2i", valid & (task == 1)), ("all", valid)):
            assert sel.any()
            np.testing.assert_allclose(r["router_acc"][name], (pred[i] == task)[sel].mean(), atol=1e-12,
                                       err_msg=f"layer {r['layer']} {name}")
            np.testing.assert_allclose(r["router_prob"][name], p_true[i][sel].mean(), rtol=1e-5,
                                       err_msg=f"layer {r['layer']} {name}")
        for g, group in enumerate(("mmu_group", "t2i_group")):
            slots = load[i, g * N:(g + 1) * N]
            want = slots / slots.sum() if slots.sum() else slots                # a group may get no token
            np.testing.assert_allclose(r["expert_load"][group]["all_tokens"], want, atol=1e-6)


def test_dense_checkpoint_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "dense"
    checkpoints.save_model(ckpt, quick_model(preset("tiny", text={"num_layers": 1})))
    with pytest.raises(ValueError, match="dense checkpoint.*no experts") as err:
        analyze.main(["experts", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    assert str(ckpt) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_intensity_curves_and_target_file(tmp_path):
    """`analyze intensity` on a dense checkpoint: mean/std over exactly --samples valid samples per
    task, equal to float64 numpy over the per-sample intensities the model's capture gives; the
    JSON loads back as an AIA target; the PNG is written; a bad --task fails naming it."""
    from unijax.analysis.intensity import intensity_curves
    from unijax.training import aia

    cfg = preset("tiny", text={"num_layers": 3})
    checkpoints.save_model(tmp_path / "model", quick_model(cfg, seed=3))
    (tmp_path / "config.json").write_text(json.dumps({"seed": SEED, "data": {"dir": str(REPO / "data")},
                                                      "train": {"batch_size": 8, "eval_batches": 2}}))
    out = tmp_path / "curves" / "und.json"
    result = analyze.main(["intensity", "--ckpt", str(tmp_path / "model"), "--task", "und", "--samples", "6",
                           "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["samples"] == 6 and saved["layers"] == 3 and len(saved["mean"]) == 3
    assert saved == json.loads(json.dumps(result))
    Image.open(out.with_suffix(".png")).verify()
    # the same batches through intensity_curves: per-sample rows -> numpy mean/std
    config, _ = heldout.run_config(tmp_path / "model")
    config.data.cfg_drop_prob = 0.0
    batches, ipr, _ = heldout.heldout_batches(cfg, config, 3, 8, SEED, str(REPO / "data"))
    curves = intensity_curves(checkpoints.load_model(tmp_path / "model"), batches, ipr, samples=6)
    per = curves["und"]["per_sample"]
    assert per.shape == (6, 3) and np.all((per > 0) & (per < 1))
    np.testing.assert_allclose(saved["mean"], per.mean(0), rtol=1e-12)
    np.testing.assert_allclose(saved["std"], per.std(0), rtol=1e-12)
    np.testing.assert_allclose(saved["other"]["gen"]["mean"], curves["gen"]["per_sample"].mean(0), rtol=1e-12)
    t = aia.layer_targets(str(out), "und", 3, curve_delta=0.02)
    np.testing.assert_allclose(t.target, per.mean(0), rtol=1e-12)
    with pytest.raises(SystemExit):
        analyze.main(["intensity", "--ckpt", str(tmp_path / "model"), "--task", "both"])
