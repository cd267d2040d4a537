"""`launch/reproduce_shapes.sh` (unijax/analysis/recipe.py): the report's tables from known results, and
the whole pipeline in --quick mode (slow: every stage of the recipe with a few steps)."""

import json
import os
import pathlib
import re
import subprocess

import envs
import numpy as np
import pytest

from unijax.analysis import recipe, summary

REPO = pathlib.Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^[+-]?\d+\.\d+( ± \d+\.\d+)?$")


def fake_results(seeds):
    runs = ("und_only", "gen_only", "joint", "aia", "stage2", "stage2_aia")
    out = {"base": {"pope": 0.5, "pope_f1": 0.6, "mc": 0.3, "geneval": 0.1}}
    for s in seeds:
        for k, run in enumerate(runs):
            out[f"seed{s}/{run}"] = {"pope": 0.60 + 0.01 * k + 0.002 * s, "pope_f1": 0.6, "mc": 0.3 + 0.01 * s,
                                     "geneval": 0.20 - 0.01 * k}
    return out


def table_cells(text):
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| run ")
            and not l.startswith("| stage |")]
    return [c.strip().strip("*") for l in rows for c in l.strip("|").split("|")[1:]]


def test_tables_pair_deltas_by_seed_and_state_claims():
    a, b, claims = recipe.tables(fake_results([0, 1]), [0, 1])
    # Both - Und. on POPE: joint (k=2) - und_only (k=0) = +0.02 for every seed: no spread
    assert "| Δ Both − single task | +0.020 ± 0.000 |" in a
    assert "| TA-MoE (stage 2) | 0.641 ± 0.001 |" in b  # 0.60 + 0.04 + {0, 0.002}
    assert all(NUMBER.match(c) for c in table_cells(a + b)), table_cells(a + b)
    assert claims[0].startswith("joint training costs understanding") and "no, the opposite (+0.020" in claims[0]
    assert "yes (-0.010" in claims[1]  # generation: joint (0.18) below gen-only (0.19)


def test_set_key_parses_command_line_values():
    c = recipe.load_config("base")
    recipe.set_key(c, "model.text.num_layers", "2")
    recipe.set_key(c, "train.learning_rate", "0.01")
    recipe.set_key(c, "data.gen_ratio", 0.0)
    assert c.model.text.num_layers == 2 and c.train.learning_rate == 0.01 and c.data.gen_ratio == 0.0


@pytest.mark.slow
def test_quick_reproduction_writes_a_full_report(tmp_path):
    env = envs.cli_env()  # one CPU device, as a user runs it
    r = subprocess.run(["bash", str(REPO / "launch" / "reproduce_shapes.sh"), "--quick", "--seeds", "0", "--out",
                        str(tmp_path / "r")],  # one seed: the spreads over seeds are tested above from known results
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "r" / "report.md").read_text()
    for heading in ("## (a) Task conflict", "## (b) Dense joint vs TA-MoE vs AIA", "## Do the paper's claims hold"):
        assert heading in report
    a_b = report.split("## (a)")[1].split("## Do the paper")[0]
    cells = table_cells(a_b)
    assert len(cells) == 4 * (5 + 7) and all(NUMBER.match(c) for c in cells), cells
    per_seed = report.split("## Per-seed values")[1].split("## Stages")[0]
    assert len([l for l in per_seed.splitlines() if l.startswith("| seed")]) == 6
    assert (tmp_path / "r" / "seed0" / "stage2" / "eval" / "shapes_geneval" / "images" / "00000" / "samples").is_dir()
    analysis = report.split("## Attention intensity and gradient conflict")[1].split("## Per-seed values")[0]
    rows = [l for l in analysis.splitlines() if l.startswith("| ") and not l.startswith("| run ")
            and not l.startswith("| layer ")]
    assert len(rows) == 2 * (5 + 1) + 2, rows  # per task: 5 runs + the target; the conflict table: 2 layers
    for png in ("intensity.png", "conflict.png"):
        assert (tmp_path / "r" / png).read_bytes()[:4] == b"\x89PNG"


def test_analysis_tables_average_seeds_and_measure_the_gap_to_the_targets():
    rng = np.random.default_rng(0)
    curves = {label: {t: rng.uniform(0, 1, (2, 3)).tolist() for t in ("und", "gen")}
              for _, label in summary.INTENSITY_RUNS}
    targets = {"und": {"target": [0.2, 0.3, 0.4], "delta": [0.05] * 3}, "gen": {"target": [0.5, 0.5, 0.5], "delta": [0.05] * 3}}
    conflict = {"dense joint": {"layer0/all": [0.1, -0.3], "layer0/attention": [None, 0.2], "layer0/ffn": [0.0, 0.0]},
                "TA-MoE": {"layer0/all": [0.5, 0.5]}}
    text = summary.analysis_tables({"intensity": curves, "targets": targets, "conflict": conflict})
    a = np.asarray(curves["TA-MoE"]["gen"], np.float64)
    gap = np.abs(a - 0.5).mean(axis=1)
    row = next(l for l in text.split("Generation")[1].splitlines() if l.startswith("| TA-MoE |"))
    assert row == ("| TA-MoE | " + " | ".join(f"{a[:, l].mean():.3f} ± {a[:, l].std():.3f}" for l in range(3))
                   + f" | {gap.mean():.3f} ± {gap.std():.3f} |")
    layer0 = next(l for l in text.splitlines() if l.startswith("| 0 |"))
    # dense all, TA-MoE all, dense attention (the None seed left out), TA-MoE attention (missing), dense ffn, ...
    assert layer0.startswith("| 0 | -0.100 ± 0.200 | 0.500 ± 0.000 | 0.200 | - | 0.000 ± 0.000 | - | - |"), layer0


def test_full_plan_builds_the_documented_base_chain(tmp_path):
    """The full reproduction's stage 0 and base are the configs' own budgets, started as `init_recipe`
    starts them (what `python -m unijax.train --config configs/base.py` builds)."""
    runs = {s.name: s for s in recipe.plan(tmp_path, [0], recipe.FULL) if not isinstance(s, tuple)}
    for name in ("stage0_lm", "stage0_vq", "base"):
        assert not any(k.startswith("train.") for k in runs[name].overrides), runs[name].overrides
    for name, dep in (("stage0_vq", "stage0_lm"), ("base", "stage0_vq")):
        c = recipe.load_config(name)
        recipe._start_from(c, dep, tmp_path / dep / "model")
        assert runs[name].overrides["init_from"] == tmp_path / dep / "model"
        assert runs[name].overrides["vision_pretrain.with_init_from"] is c.vision_pretrain.with_init_from is True
    assert runs["seed0/joint"].overrides["train.batch_size"] == recipe.FULL.batch_size
    assert recipe.stage_budgets(recipe.FULL)["base"] == (recipe.load_config("base").train.steps, 32)


@pytest.mark.parametrize("family, budget", [("janus", recipe.FULL), ("emu3", recipe.QUICK)])
def test_plan_stage0_is_what_init_recipe_builds_for_the_base(tmp_path, family, budget):
    """The plan's stage-0 configs equal `build_prerequisites`'s for the same base config (its INHERITED
    keys set on the stage's config): the reproduction's stage 0 is the base command's."""
    runs = {s.name: s for s in recipe.plan(tmp_path, [0], budget, family) if not isinstance(s, tuple)}
    base = recipe.stage_config(runs["base"], tmp_path)
    for name, dep in (("stage0_lm", None), ("stage0_vq", "stage0_lm")):
        built = recipe.load_config(name)
        for key in recipe.INHERITED:
            recipe.set_key(built, key, recipe._get(base, key))
        if dep:
            recipe._start_from(built, dep, tmp_path / dep / "model")
        budget_keys = dict(o.split("=", 1) for o in budget.overrides)  # the budget's (QUICK: every stage's)
        for k, v in runs[name].overrides.items():
            if k.startswith("train.") or k in budget_keys:
                recipe.set_key(built, k, v)
        diff = recipe._differences(json.loads(built.to_json()), json.loads(recipe.stage_config(runs[name], tmp_path).to_json()))
        assert diff == [], (name, diff)


def fake_base_workdir(src, out, stages):
    by = {s.name: s for s in stages if not isinstance(s, tuple)}
    for name, d in (("stage0_lm", src / "prerequisites" / "stage0_lm"), ("stage0_vq", src / "prerequisites" / "stage0_vq"),
                    ("base", src)):
        (d / "model").mkdir(parents=True)
        (d / "model" / "model.json").write_text("{}")
        c = recipe.stage_config(by[name], out)
        c.workdir, c.eval_suites.names = str(d), ("shapes_pope",)  # keys that do not change the model
        (d / "config.json").write_text(c.to_json())
        if name != "base":
            (d / "DONE").write_text('{"seconds": 12.0}')


def test_base_from_copies_a_matching_base_and_refuses_another(tmp_path):
    out, src = tmp_path / "r", tmp_path / "b"
    stages = recipe.plan(out, [0], recipe.FULL)
    fake_base_workdir(src, out, stages)
    good = (src / "config.json").read_text()
    bad = json.loads(good)
    bad["train"]["steps"] += 1
    (src / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"config.json is not the base stage .*train.steps=601"):
        recipe.adopt_base(src, out, stages)
    assert not out.exists()  # checked before anything is copied
    (src / "config.json").write_text(good)
    recipe.adopt_base(src, out, stages)
    assert json.loads((out / "stage0_vq" / "DONE").read_text()) == {
        "seconds": 12.0, "copied_from": str((src / "prerequisites" / "stage0_vq").absolute())}
    assert (out / "base" / "model" / "model.json").is_file() and not (out / "base" / "prerequisites").exists()
    # the base's own time is the span from the VQ stage's end to its model; a copy that gave both files
    # the same time leaves it unknown (None), not 0
    base_stage = next(st for st in stages if not isinstance(st, tuple) and st.name == "base")
    assert json.loads((out / "base" / "DONE").read_text())["seconds"] is None
    assert recipe.train_stage(base_stage, out) is None
    vq_done = (src / "prerequisites" / "stage0_vq" / "DONE").stat().st_mtime
    os.utime(src / "model" / "model.json", (vq_done + 600.0, vq_done + 600.0))
    recipe.adopt_base(src, tmp_path / "timed", stages)
    assert recipe.train_stage(base_stage, tmp_path / "timed") == pytest.approx(600.0)
    (src / "prerequisites" / "stage0_lm" / "DONE").unlink()
    with pytest.raises(FileNotFoundError, match="stage0_lm/DONE not found"):
        recipe.adopt_base(src, tmp_path / "other", stages)


def test_emu3_plan_runs_every_stage_on_emu3_from_its_own_stage0(tmp_path):
    stages = recipe.plan(tmp_path, [0, 1], recipe.QUICK, "emu3")
    runs = [s for s in stages if not isinstance(s, tuple)]
    assert [s.name for s in runs][:4] == ["stage0_lm", "stage0_vq", "base", "seed0/und_only"]
    assert runs[1].overrides["init_from"] == tmp_path / "stage0_lm" / "model"
    assert runs[2].overrides["init_from"] == tmp_path / "stage0_vq" / "model"
    assert all(s.overrides["model.family"] == "emu3" for s in runs)
    assert all("--config.model.family=emu3" in s.command(tmp_path) for s in runs)
    janus = [s for s in recipe.plan(tmp_path, [0], recipe.QUICK) if not isinstance(s, tuple)]
    assert janus[0].name == "stage0_lm" and all("model.family" not in s.overrides for s in janus)
