"""Fine-tuning Janus-Pro on your own data, end to end on a full-format replica (`tests/replica.py`).

Every step is the CLI a user runs (docs/finetune_janus_pro.md) with the recipe configs of
`configs/janus_pro/`, changing only paths and sizes (steps, batch; the recipes take the tiny converted
model's architecture from it, and fit their mesh to the 2 devices): convert -> pack -> stage 1 x 2 ->
upcycle -> stage 2 + AIA -> expert loads and attention intensity on the same data -> evaluate POPE
and MMMU in their official layouts -> generate -> export to transformers.
"""

import json
import shutil
import subprocess
import sys

import envs
import pytest
import replica

CONFIGS = replica.pathlib.Path(__file__).resolve().parents[1] / "configs" / "janus_pro"
SMALL = ["--config.train.steps=4", "--config.train.batch_size=4",
         "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.train.log_every=2",
         "--config.data.num_workers=0", "--config.data.eval_split=0.1"]  # the recipes' mesh fits the 2 devices


def cli(cwd, *args, ok=True):
    r = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=envs.cli_env(2), capture_output=True, text=True,
                       timeout=600)
    if ok:
        assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_finetune_janus_pro_on_your_data_replica(tmp_path):
    paths = replica.build(tmp_path)
    hf = paths["hf"]

    # a checkpoint whose config and tokenizer disagree is refused, naming both, and nothing is written
    bad = tmp_path / "bad_hf"
    shutil.copytree(hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["pad_token_id"] = 5
    (bad / "config.json").write_text(json.dumps(cfg))
    r = cli(tmp_path, "unijax.convert", "--hf_dir", str(bad), "--out", "ckpt/bad", ok=False)
    assert r.returncode == 2 and "pad_id=2 but model.text.pad_token_id=5" in r.stderr
    assert not (tmp_path / "ckpt" / "bad").exists()

    cli(tmp_path, "unijax.convert", "--hf_dir", str(hf), "--out", "ckpt/janus_pro_tiny", "--scan_layers")
    assert (tmp_path / "ckpt/janus_pro_tiny/tokenizer/tokenizer.json").is_file()
    r = cli(tmp_path, "unijax.pack", "--mmu", "data/llava.json", "--t2i", "data/captions.jsonl,data/captions.parquet",
            "--out", "packed", "--records_per_shard", "16")
    assert "mmu: 3 shards, 38 records" in r.stdout and "t2i: 3 shards, 36 records" in r.stdout

    base = ["--config.init_from=ckpt/janus_pro_tiny", *SMALL]
    cli(tmp_path, "unijax.train", "--config", f"{CONFIGS}/stage1_und.py:1b", "--config.workdir=workdir/stage1_und",
        "--config.data.mmu_arrayrecord=packed/mmu-*.arrayrecord", *base)
    cli(tmp_path, "unijax.train", "--config", f"{CONFIGS}/stage1_gen.py:1b", "--config.workdir=workdir/stage1_gen",
        "--config.data.t2i_arrayrecord=packed/t2i-*.arrayrecord", *base)
    und = metrics(tmp_path / "workdir/stage1_und/metrics.jsonl")
    assert [r["step"] for r in und if "heldout/accuracy" in r] == [2, 4]
    cli(tmp_path, "unijax.upcycle", "--base", "ckpt/janus_pro_tiny", "--und", "workdir/stage1_und/model",
        "--gen", "workdir/stage1_gen/model", "--out", "workdir/upcycled", "--noise", "0.01")
    cli(tmp_path, "unijax.train", "--config", f"{CONFIGS}/stage2.py:1b+aia", "--config.init_from=workdir/upcycled",
        "--config.workdir=workdir/stage2_aia", "--config.data.mmu_arrayrecord=packed/mmu-*.arrayrecord",
        "--config.data.t2i_arrayrecord=packed/t2i-*.arrayrecord", *SMALL)
    last = {k: v for r in metrics(tmp_path / "workdir/stage2_aia/metrics.jsonl") if r["step"] == 4 for k, v in r.items()}
    assert all(k in last for k in ("aia_loss_gen", "aia_loss_und", "loss_group", "heldout/router_acc")), sorted(last)
    model = tmp_path / "workdir/stage2_aia/model"
    assert (model / "tokenizer/tokenizer.json").is_file() and (tmp_path / "workdir/stage2_aia/adapters").is_dir()

    # the methods' diagnostics on the same data (the run's held-out split of the packed files)
    r = cli(tmp_path, "unijax.analyze", "experts", "--ckpt", str(model), "--num_batches", "1")
    assert (model.parent / "analysis/experts.json").is_file()
    cli(tmp_path, "unijax.analyze", "intensity", "--ckpt", str(model), "--task", "und", "--samples", "4",
        "--out", "und_curve.json")
    curve = json.loads((tmp_path / "und_curve.json").read_text())
    assert curve["task"] == "und" and len(curve["mean"]) == 2 and 1 <= curve["samples"] <= 4  # each held-out record once

    cli(tmp_path, "unijax.evaluate", "--ckpt", str(model), "--suite", "pope", "--files",
        "pope/coco_pope_random.json,pope/coco_pope_popular.json,pope/coco_pope_adversarial.json",
        "--image_root", "pope/val2014", "--max_new_tokens", "4")
    pope = json.loads((model.parent / "eval/pope/results.json").read_text())
    assert {"random", "popular", "adversarial", "average"} <= set(json.dumps(pope).replace('"', " ").split())
    cli(tmp_path, "unijax.evaluate", "--ckpt", str(model), "--suite", "mmmu", "--files", "MMMU", "--max_new_tokens", "4")
    mmmu = (model.parent / "eval/mmmu/results.md").read_text()
    assert "all (3 questions, 1 open)" in mmmu

    cli(tmp_path, "unijax.generate", "--ckpt", str(model), "--prompt", "a red circle", "--num_images", "2",
        "--out", "samples.png")
    assert (tmp_path / "samples.png").is_file()
    r = cli(tmp_path, "unijax.generate", "--ckpt", str(model), "--image", "data/images/004.png", "--question",
            "what colour is the circle?")
    assert "A:" in r.stdout

    cli(tmp_path, "unijax.convert", "--to_hf", "--ckpt", "workdir/stage1_und/model", "--out", "exported")
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    JanusForConditionalGeneration.from_pretrained(tmp_path / "exported")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "exported"), local_files_only=True)
    assert tok.pad_token_id == 2

    # the recipe's final model (TA-MoE + LoRA + AIA) in transformers, with its modeling code
    cli(tmp_path, "unijax.convert", "--to_hf", "--ckpt", str(model), "--out", "exported_moe")
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText

    from unijax import checkpoints

    hf_moe = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported_moe", trust_remote_code=True).eval()
    cfg = checkpoints.read_config(model)
    ours = checkpoints.load_model(model, dtype="float32", param_dtype="float32",  # the recipe computes in bf16
                                  moe=dataclasses.replace(cfg.moe, group_assignment="router", impl="dropless"))
    ids = [1, 5, 6, 7, 8, 9, 10, 11]
    with torch.no_grad():
        ref = hf_moe(input_ids=torch.tensor([ids])).logits.numpy()
    tok = jnp.asarray([ids])
    h, _ = ours(tok, jnp.zeros_like(tok), jnp.arange(len(ids))[None], jnp.ones_like(tok), None)
    got = np.asarray(ours.text_logits(h), np.float32)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
