"""The UniDecouple experiments end to end on the shapes world: the stages (`plan`), their budgets
(`FULL`, `QUICK`), running them (`run`), the paper's claims (`CLAIMS`) and the report
(`write_report`). The stages, the report and the command line are described in
`unijax.reproduce` (`python -m unijax.reproduce`, `launch/reproduce_shapes.sh`).

Paths in the report and its commands are written relative to the current directory (the
repository, for the documented commands) when they lie below it.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from unijax.analysis.summary import analyse, analysis_tables, cell
from unijax.inference import suites
from unijax.inference.engine import Engine
from unijax.io import write_outputs
from unijax.models.config import MoEConfig
from unijax.training import loop
from unijax.training.upcycle import upcycle_checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the stage configs are the repository's configs/*.py


def shown(path: str | os.PathLike) -> str:
    """`path` as a report prints it: relative to the current directory (the repository, for the
    documented commands) when it lies below it, else absolute."""
    p = pathlib.Path(path).absolute()
    try:
        return str(p.relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(p)


METRICS = (("pope", "POPE acc."), ("pope_f1", "POPE F1"), ("mc", "MC acc."), ("geneval", "GenEval"))
UND_METRICS, GEN_METRICS = ("pope", "pope_f1", "mc"), ("geneval",)
# the paper's claims: (statement, run, the run it is compared with, metric, whether higher is the claim)
CLAIMS = (
    ("joint training costs understanding (POPE, paper −0.7 points)", "joint", "und_only", "pope", False),
    ("joint training costs generation (GenEval, paper −0.01)", "joint", "gen_only", "geneval", False),
    ("TA-MoE recovers understanding over dense joint (POPE)", "stage2", "joint", "pope", True),
    ("TA-MoE recovers generation over dense joint (GenEval)", "stage2", "joint", "geneval", True),
    ("AIA helps the dense model (POPE)", "aia", "joint", "pope", True),
    ("AIA helps the dense model (GenEval)", "aia", "joint", "geneval", True),
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps and batch sizes of the reproduction's stages. `None`: the stage config's own, so the full
    reproduction's stage 0 and base are exactly what `python -m unijax.train --config configs/base.py`
    builds (its `init_recipe` chain), and a base built that way can be copied in (docs/reproduce_shapes.md)."""
    lm_steps: int | None = None          # the language stage (configs/stage0_lm.py)
    vq_steps: int | None = None          # the VQ tokenizer (configs/stage0_vq.py)
    base_steps: int | None = None        # the dense base (configs/base.py)
    base_batch_size: int | None = None   # those three stages' batch
    adaptor_warmup_steps: int | None = None  # the base's adaptor warm-up (`adaptor_warmup.steps`)
    steps: int = 200                     # every per-seed run (TOC, stage 1 x 2, stage 2, AIA variants)
    batch_size: int = 32                 # every per-seed run's batch
    pope_images: int = 100
    mc_questions: int = 200
    geneval_per_tag: int = 8
    geneval_samples: int = 2
    intensity_samples: int = 100         # held-out samples per task behind each intensity curve
    conflict_batches: int = 8            # held-out batches per task behind each gradient-conflict measurement
    overrides: tuple[str, ...] = ()      # applied to every stage (same architecture throughout)


FULL = Budget()
QUICK = Budget(lm_steps=8, vq_steps=8, base_steps=8, base_batch_size=8, steps=4, batch_size=8, pope_images=4,
               mc_questions=6, geneval_per_tag=1, geneval_samples=1, intensity_samples=4, conflict_batches=1,
               overrides=("model.text.num_layers=2", "train.eval_batches=2", "vision_pretrain.steps=8",
                          "vision_pretrain.eval_images=16"), adaptor_warmup_steps=4)


def load_config(name: str, arg: str | None = None):
    path = REPO_ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"unijax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO_ROOT))  # configs import each other as `configs.<name>`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO_ROOT))
    return module.get_config(arg)


def set_key(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    if isinstance(value, str) and not isinstance(node[leaf], str):
        value = type(node[leaf])(ast.literal_eval(value)) if node[leaf] is not None else ast.literal_eval(value)
    node[leaf] = value


@dataclasses.dataclass
class Stage:
    name: str                  # workdir name under DIR
    config: str                # configs/<config>.py[:arg]
    overrides: dict
    evaluate: bool = True

    def command(self, out: pathlib.Path) -> str:
        flags = [f"--config.{k}={shown(v) if isinstance(v, pathlib.Path) else v}"
                 for k, v in {"workdir": out / self.name, **self.overrides}.items()]
        return "python -m unijax.train --config configs/" + self.config.replace(":", ".py:", 1) + \
            ("" if ":" in self.config else ".py") + " " + " ".join(map(str, flags))


def _steps(steps: int | None, warmup_fraction: int = 10) -> dict:
    """A stage's step budget: `steps` steps with 1/`warmup_fraction` of them warm-up, one checkpoint and
    one evaluation at the end; `None`: the stage config's own budget (no override)."""
    if steps is None:
        return {}
    return {"train.steps": steps, "train.warmup_steps": max(1, steps // warmup_fraction),
            "train.checkpoint_every": steps, "train.eval_every": steps}


BASE_CHAIN = (("stage0_lm", "lm_steps"), ("stage0_vq", "vq_steps"), ("base", "base_steps"))


def stage_budgets(b: Budget) -> dict[str, tuple[int, int]]:
    """(steps, batch size) each stage of the base chain runs with (its config's where `b` leaves it `None`)."""
    out = {}
    for name, field in BASE_CHAIN:
        c = load_config(name)
        out[name] = (getattr(b, field) or c.train.steps, b.base_batch_size or c.train.batch_size)
    return out


def plan(out: pathlib.Path, seeds: list[int], b: Budget, family: str = "janus") -> list[Stage | tuple]:
    """The ordered stages; tuples are upcycling steps ("upcycle", seed). `family="emu3"` runs every
    stage, stage 0 (its VQ-VAE) included, on the tiny Emu3-style model (`model.family=emu3`)."""
    common = {"eval_suites.names": (),  # evaluate_model runs the suites
              **dict(o.split("=", 1) for o in b.overrides)}
    if family != "janus":
        common["model.family"] = family
    chain = {**common, **({"train.batch_size": b.base_batch_size} if b.base_batch_size else {})}
    base_model = out / "base" / "model"
    per_run = {**_steps(b.steps), "train.batch_size": b.batch_size, "init_from": base_model}
    # stage 0 as `init_recipe` builds it for the base (build_prerequisites): the base's INHERITED keys, each
    # stage from the model before (_start_from)
    stages: list = [
        Stage("stage0_lm", "stage0_lm", {**chain, **_inherited("stage0_lm", common), **_steps(b.lm_steps)},
              evaluate=False),
        Stage("stage0_vq", "stage0_vq", {**chain, **_inherited("stage0_vq", common), **_steps(b.vq_steps, warmup_fraction=8),
                                         **_from_recipe_model("stage0_lm", out / "stage0_lm" / "model")},
              evaluate=False),
        Stage("base", "base", {**chain, **_steps(b.base_steps),
                               **({"adaptor_warmup.steps": b.adaptor_warmup_steps} if b.adaptor_warmup_steps is not None else {}),
                               **_from_recipe_model("stage0_vq", out / "stage0_vq" / "model")}),
    ]
    for s in seeds:
        run = {**common, **per_run, "seed": s}
        stages += [
            Stage(f"seed{s}/und_only", "base", {**run, "data.gen_ratio": 0.0}),
            Stage(f"seed{s}/gen_only", "base", {**run, "data.und_ratio": 0.0}),
            Stage(f"seed{s}/joint", "base", run),
            Stage(f"seed{s}/aia", "aia", run),
            Stage(f"seed{s}/stage1_und", "stage1_und", run, evaluate=False),
            Stage(f"seed{s}/stage1_gen", "stage1_gen", run, evaluate=False),
            ("upcycle", s),
            Stage(f"seed{s}/stage2", "stage2", {**run, "init_from": out / f"seed{s}" / "upcycled"}),
            Stage(f"seed{s}/stage2_aia", "stage2:aia", {**run, "init_from": out / f"seed{s}" / "upcycled"}),
        ]
    return stages


# -- a run's prerequisites (init_recipe) ---------------------------------------------------------------
# The recipe's models: name -> (its stage config in configs/, or None for upcycling; the models it starts
# from). A stage trains from the first model it names (`init_from`); upcycling combines all three.
RECIPE = {
    "stage0_lm": ("stage0_lm", ()),
    "stage0_vq": ("stage0_vq", ("stage0_lm",)),
    "base": ("base", ("stage0_vq",)),
    "stage1_und": ("stage1_und", ("base",)),
    "stage1_gen": ("stage1_gen", ("base",)),
    "upcycled": (None, ("base", "stage1_und", "stage1_gen")),
    "stage2": ("stage2", ("upcycled",)),
}
UNTRAINED_TOWER = ("stage0_lm", "stage0_vq")  # recipe models whose vision tower is untrained (decoder / VQ trained)
# what a prerequisite takes over from the run that needs it (the architecture, where the data lives, the seed)
INHERITED = ("model.family", "model.preset", "model.text", "model.vision", "model.vq", "model.dtype",
             "model.param_dtype", "model.attention_impl", "data.dir", "data.tokenizer", "seed", "mesh")


def _leaves(value, prefix: str) -> dict:
    value = value.to_dict() if hasattr(value, "to_dict") else value
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def _inherited(stage: str, common: dict) -> dict:
    """The overrides that give `stage`'s config the base config's `INHERITED` keys (leaf by leaf, where
    they differ; `common` applied to both), as `build_prerequisites` does for the base's stage 0."""
    base, own = load_config("base"), load_config(stage)
    for c in (base, own):
        for k, v in common.items():
            set_key(c, k, v)
    out = {}
    for key in INHERITED:
        if key in ("seed", "data.dir", "mesh"):  # the reproduction sets these for every stage alike
            continue
        theirs, mine = _leaves(_get(base, key), key), _leaves(_get(own, key), key)
        out |= {k: v for k, v in theirs.items() if mine.get(k, object()) != v}
    return out


def _order(name: str, seen: list[str]) -> list[str]:
    for dep in RECIPE[name][1]:
        _order(dep, seen)
    if name not in seen:
        seen.append(name)
    return seen


def build_prerequisites(config, log=print) -> pathlib.Path:
    """Builds `config.init_recipe`'s model and every model it needs under `<workdir>/prerequisites/<name>`
    with the stage configs' own budgets (a finished one is reused, an interrupted one resumes from its
    checkpoints), and returns the model directory to start from. Each stage prints its command and
    its progress; the architecture, data directory, seed and mesh come from `config`."""
    name = config.init_recipe
    if name not in RECIPE:
        raise ValueError(f"init_recipe={name!r}: expected one of {sorted(RECIPE)} (or '' for none)")
    root = pathlib.Path(config.workdir).absolute() / "prerequisites"
    todo = _order(name, [])
    t0 = time.perf_counter()
    for k, step in enumerate(todo, 1):
        workdir = root / step
        done = (workdir / "DONE").is_file()
        log(f"== prerequisite {k}/{len(todo)}: {step} ({'built, reused' if done else 'building'}; "
            f"{(time.perf_counter() - t0) / 60:.1f} min so far) -> {shown(workdir / 'model')}")
        if done:
            continue
        t_stage = time.perf_counter()
        stage, deps = RECIPE[step]
        if stage is None:
            moe = config.moe.to_dict()
            moe = MoEConfig(**{k: (tuple(v) if k == "layers" else v) for k, v in moe.items() if v is not None})
            dst = workdir / "model"
            if jax.process_index() == 0:  # one writer; the other processes wait for it below
                if dst.exists():  # written atomically, but its DONE is missing: redo it
                    shutil.rmtree(dst)
                base, und, gen = (root / d / "model" for d in deps)
                upcycle_checkpoint(base, dst, und, gen, moe, noise=0.01, seed=int(config.seed))
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("unijax_upcycled")
        else:
            c = load_config(stage)
            for key in INHERITED:
                set_key(c, key, _get(config, key))
            c.workdir, c.init_recipe = str(workdir), ""
            if deps:
                _start_from(c, deps[0], root / deps[0] / "model")
            loop.train(c)
        if jax.process_index() == 0:
            (workdir / "DONE").write_text(json.dumps({"seconds": time.perf_counter() - t_stage}))
    log(f"== prerequisites ready in {(time.perf_counter() - t0) / 60:.1f} min: starting from "
        f"{shown(root / name / 'model')}")
    return root / name / "model"


def _from_recipe_model(name: str, model_dir: pathlib.Path) -> dict:
    """The overrides that start a stage from the recipe model `name` at `model_dir`: `init_from`, and
    since a stage-0 model's vision tower is untrained, its pre-training (`vision_pretrain.with_init_from`)."""
    return {"init_from": model_dir, **({"vision_pretrain.with_init_from": True} if name in UNTRAINED_TOWER else {})}


def _start_from(config, name: str, model_dir: pathlib.Path) -> None:
    for key, value in _from_recipe_model(name, model_dir).items():
        set_key(config, key, str(value) if isinstance(value, pathlib.Path) else value)


def start_from_prerequisites(config, log=print) -> None:
    """Starts `config` from its `init_recipe` model, built first when needed (`build_prerequisites`)."""
    _start_from(config, config.init_recipe, build_prerequisites(config, log))


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node.copy_and_resolve_references() if hasattr(node, "copy_and_resolve_references") else node


def stage_config(stage: Stage, out: pathlib.Path):
    """The training config `stage` runs with: its config file, the plan's overrides, its workdir and the
    reproduction's data directory."""
    config = load_config(*stage.config.split(":", 1)) if ":" in stage.config else load_config(stage.config)
    config.workdir = str(out / stage.name)
    config.data.dir = str(out / "data")
    for k, v in stage.overrides.items():
        set_key(config, k, str(v) if isinstance(v, pathlib.Path) else v)
    return config


def train_stage(stage: Stage, out: pathlib.Path) -> float | None:
    """Runs (or resumes) a stage unless its model is complete; returns the seconds it took (None: a copied
    base whose time is unknown)."""
    workdir = out / stage.name
    if (workdir / "DONE").is_file():
        seconds = json.loads((workdir / "DONE").read_text())["seconds"]
        return None if seconds is None else float(seconds)
    config = stage_config(stage, out)
    print(f"\n== {stage.name}: {stage.command(out)}", flush=True)
    t0 = time.perf_counter()
    loop.train(config)
    seconds = time.perf_counter() - t0
    (workdir / "DONE").write_text(json.dumps({"seconds": seconds}))
    return seconds


# keys that do not change what a stage trains (where it runs, what it starts from, the suites it logs)
ADOPT_IGNORED = ("workdir", "init_from", "init_recipe", "data.dir", "eval_suites")


def _differences(used: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(used) | set(wanted)):
        key = prefix + k
        if key in ADOPT_IGNORED:
            continue
        a, b = used.get(k, "<missing>"), wanted.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, key + ".")
        elif a != b:
            out.append(f"{key}={a!r} (the reproduction's: {b!r})")
    return out


def adopt_base(src: pathlib.Path, out: pathlib.Path, stages: list) -> None:
    """Copies a finished `python -m unijax.train --config configs/base.py --config.workdir=SRC` in as the
    plan's language stage, VQ stage and base (`SRC/prerequisites/stage0_lm`, `.../stage0_vq`, `SRC`), after
    checking that each was trained with exactly the config this reproduction would train it with (every
    key but `ADOPT_IGNORED`). Stages `out` already holds are kept."""
    sources = {"stage0_lm": src / "prerequisites" / "stage0_lm", "stage0_vq": src / "prerequisites" / "stage0_vq",
               "base": src}
    by_name = {s.name: s for s in stages if isinstance(s, Stage)}
    for name, d in sources.items():  # check every source before copying any
        for need in (d / "model" / "model.json", d / "config.json", *([d / "DONE"] if name != "base" else [])):
            if not need.is_file():
                raise FileNotFoundError(f"--base_from {src}: {need} not found; expected the workdir of a finished "
                                        f"`python -m unijax.train --config configs/base.py --config.workdir={src}`")
        diff = _differences(json.loads((d / "config.json").read_text()),
                            json.loads(stage_config(by_name[name], out).to_json()))
        if diff:
            raise ValueError(f"--base_from {src}: {d / 'config.json'} is not the {name} stage this reproduction "
                             f"trains: " + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else ""))
    for name, d in sources.items():
        dst = out / name
        if (dst / "DONE").is_file():
            continue
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(d, dst, ignore=shutil.ignore_patterns("prerequisites", "eval", "analysis"))
        if (d / "DONE").is_file():
            seconds = float(json.loads((d / "DONE").read_text())["seconds"])
        else:  # the base run itself: from its start (the VQ stage's end) to its model, suites excluded;
            # unknown (None) when a copy of the workdir gave both files the same time
            span = (d / "model" / "model.json").stat().st_mtime - (sources["stage0_vq"] / "DONE").stat().st_mtime
            seconds = span if span >= 1.0 else None
        (dst / "DONE").write_text(json.dumps({"seconds": seconds, "copied_from": str(d.absolute())}))
        print(f"== {name}: copied from {shown(d)} (--base_from)", flush=True)


def _first_seconds(took: pathlib.Path, t0: float) -> float:
    """The seconds since `t0`, kept in `took` by the first (complete) run of a step; reruns, which reuse
    that step's files, return the first run's time."""
    if not took.is_file():
        took.write_text(f"{time.perf_counter() - t0:.3f}")
    return float(took.read_text())


def upcycle_stage(out: pathlib.Path, seed: int, b: Budget) -> float:
    """Upcycles the seed's stage-1 models unless done; returns the seconds the (first) upcycling took."""
    dst = out / f"seed{seed}" / "upcycled"
    t0 = time.perf_counter()
    if not (dst / "model.json").is_file():
        c = load_config("stage2")
        moe = MoEConfig(**{k: (tuple(v) if k == "layers" else v) for k, v in c.moe.to_dict().items() if v is not None})
        upcycle_checkpoint(out / "base" / "model", dst, out / f"seed{seed}" / "stage1_und" / "model",
                           out / f"seed{seed}" / "stage1_gen" / "model", moe, noise=0.01, seed=seed)
    return _first_seconds(out / f"seed{seed}" / "UPCYCLE_SECONDS", t0)  # beside the model (Orbax's folder)


def evaluate_model(model_dir: pathlib.Path, b: Budget, seed: int) -> dict[str, float]:
    """`shapes_pope`, `shapes_mc`, `shapes_geneval` (written under `<stage>/eval/<suite>` like
    `python -m unijax.evaluate`, resumable) -> the report's metrics."""
    engine = Engine.load(model_dir, batch_size=16)
    o = suites.Options(seed=seed, size=engine.image_size, num_images=b.pope_images, num_questions=b.mc_questions,
                       per_tag=b.geneval_per_tag, samples=b.geneval_samples)
    fp = {"checkpoint": str(model_dir.absolute()), "group": "router"}
    res = {s: suites.run(s, engine, o, model_dir.parent / "eval" / s, chunk=64, fingerprint=fp)
           for s in ("shapes_pope", "shapes_mc", "shapes_geneval")}
    return {"pope": res["shapes_pope"]["average"]["accuracy"], "pope_f1": res["shapes_pope"]["average"]["f1"],
            "mc": res["shapes_mc"]["accuracy"], "geneval": res["shapes_geneval"].get("overall", 0.0)}


# -- report -------------------------------------------------------------------------------------------
def _delta(a: list[float], b: list[float]) -> str:
    d = np.asarray(a) - np.asarray(b)  # paired by seed
    return f"{np.mean(d):+.3f}" + (f" ± {np.std(d):.3f}" if len(d) > 1 else "")


def eval_sizes(b: Budget) -> dict[str, int]:
    """Scored answers (or samples) behind each metric: POPE accuracy per split (a positive and a
    negative per image), MC questions, GenEval samples."""
    return {"pope": 2 * b.pope_images, "pope_f1": b.pope_images, "mc": b.mc_questions,
            "geneval": 6 * b.geneval_per_tag * b.geneval_samples}


def tables(results: dict, seeds: list[int], sizes: dict[str, int] | None = None) -> tuple[str, str, list[str]]:
    def vals(run, m):
        return [results[f"seed{s}/{run}"][m] for s in seeds]

    head = "| run | " + " | ".join(n for _, n in METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    a = head
    for run, label in (("und_only", "Und. only"), ("gen_only", "Gen. only"), ("joint", "Both (joint)")):
        a += f"| {label} | " + " | ".join(cell(vals(run, m)) for m, _ in METRICS) + " |\n"
    a += "| Δ Both − single task | " + " | ".join(
        _delta(vals("joint", m), vals("und_only" if m in UND_METRICS else "gen_only", m)) for m, _ in METRICS) + " |\n"
    a += "| base (start of every run) | " + " | ".join(f"{results['base'][m]:.3f}" for m, _ in METRICS) + " |\n"
    b = head
    for run, label in (("joint", "dense joint"), ("stage2", "TA-MoE (stage 2)"), ("aia", "dense + AIA"),
                       ("stage2_aia", "TA-MoE + AIA")):
        b += f"| {label} | " + " | ".join(cell(vals(run, m)) for m, _ in METRICS) + " |\n"
    for run, label in (("stage2", "Δ TA-MoE − dense"), ("aia", "Δ AIA − dense"), ("stage2_aia", "Δ TA-MoE+AIA − dense")):
        b += f"| {label} | " + " | ".join(_delta(vals(run, m), vals("joint", m)) for m, _ in METRICS) + " |\n"

    def verdict(x: list[float], y: list[float], better: bool, metric: str) -> str:
        """A difference counts when it exceeds twice both the seeds' spread and the evaluation's own
        sampling error (binomial standard error of a difference of two rates over `sizes[metric]`)."""
        d = np.asarray(x) - np.asarray(y)
        spread = float(np.std(d)) if len(d) > 1 else 0.0
        p = float(np.clip(np.mean(np.concatenate([x, y])), 0.01, 0.99))
        n = (sizes or {}).get(metric, 0) * len(d)
        se = float(np.sqrt(2 * p * (1 - p) / n)) if n else 0.0
        if abs(np.mean(d)) <= 2 * max(spread, se, 0.0025):
            return f"no clear difference ({_delta(x, y)}; noise level ±{2 * max(spread, se):.3f})"
        return ("yes" if (np.mean(d) > 0) == better else "no, the opposite") + f" ({_delta(x, y)})"

    claims = [f"{label}: " + verdict(vals(run, metric), vals(reference, metric), better=better, metric=metric)
              for label, run, reference, metric, better in CLAIMS]
    return a, b, claims


def write_report(out: pathlib.Path, results: dict, timings: dict, commands: list[str], seeds: list[int], quick: bool,
                 b: Budget, argv: list[str], family: str = "janus", analysis: dict | None = None) -> pathlib.Path:
    a, t, claims = tables(results, seeds, eval_sizes(b))
    chain = stage_budgets(b)
    cmd = "bash launch/reproduce_shapes.sh " + " ".join(argv)
    total = sum(v for v in timings.values() if v is not None)
    unknown = [k for k, v in timings.items() if v is None]
    lines = [
        "# UniDecouple on the shapes world" + ("" if family == "janus" else f" ({family} architecture)")
        + (" (--quick: pipeline smoke test, numbers meaningless)" if quick else ""),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; total {total / 60:.1f} min"
        + (f" ({', '.join(unknown)}: time unknown)." if unknown else "."),
        "",
        "Budgets (steps x batch): " + ", ".join(f"{n} {k} x {bs}" for n, (k, bs) in chain.items())
        + ("" if (b.lm_steps, b.vq_steps, b.base_steps, b.base_batch_size, b.adaptor_warmup_steps) != (None,) * 5 else
           " (the configs' own: the base `python -m unijax.train --config configs/base.py` builds)")
        + f"; every per-seed run {b.steps} x {b.batch_size}; seeds {', '.join(map(str, seeds))} (data order, LoRA "
        f"init, upcycling noise). Evaluation on held-out scenes: `shapes_pope` ({b.pope_images} images, accuracy and "
        f"F1 averaged over the random / popular / adversarial splits), `shapes_mc` ({b.mc_questions} lettered questions), `shapes_geneval` "
        f"({b.geneval_per_tag} prompts per tag x {b.geneval_samples} samples, overall = mean over the six tags). "
        "Cells: mean ± std over seeds; deltas are paired by seed. A claim's difference counts only when it "
        "exceeds twice both the seeds' spread and the evaluation's binomial sampling error.",
        "",
        "## (a) Task conflict: each task alone vs both (the paper's TOC validation)",
        "",
        a,
        "## (b) Dense joint vs TA-MoE vs AIA",
        "",
        t,
        "TA-MoE runs spend 3 x the budget from the base (stage 1 on each task, then stage 2); the dense runs one.",
        "",
        "## Do the paper's claims hold here?",
        "",
        *[f"- {c}" for c in claims],
        "",
        *([] if analysis is None else [
            "## Attention intensity and gradient conflict",
            "",
            "![intensity](intensity.png)",
            "",
            "![conflict](conflict.png)",
            "",
            analysis_tables(analysis),
        ]),
        "## Per-seed values",
        "",
        "| run | " + " | ".join(n for _, n in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
        *[f"| {k} | " + " | ".join(f"{v[m]:.3f}" for m, _ in METRICS) + " |" for k, v in results.items()],
        "",
        "## Stages (seconds)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | " + ("unknown (the copy lost its files' times)" if v is None else f"{v:.0f}") + " |"
          for k, v in timings.items()],
        "",
        "## Commands",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    report = {"results": results, "timings": timings, "seeds": seeds, "quick": quick, "budget": dataclasses.asdict(b),
              "stage_budgets": chain, "claims": claims, "analysis": analysis}
    write_outputs(out, {"report.md": lambda p: p.write_text("\n".join(lines)),
                        "report.json": lambda p: p.write_text(json.dumps(report, indent=2) + "\n")})
    return out / "report.md"


def compile_once(out: pathlib.Path) -> None:
    """Runs that compile the same programs again (seeds, rounds) share `<out>/.jax_cache`, unless a
    persistent compilation cache is already set."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(out / ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def run(out: pathlib.Path, seeds: list[int], b: Budget, family: str, quick: bool, argv: list[str],
        base_from: pathlib.Path | None = None) -> pathlib.Path:
    """Runs (or resumes) every stage into `out`, evaluates, and writes the report; returns its path.
    `base_from`: a finished `configs/base.py` workdir whose stage 0 and base are copied in (`adopt_base`)."""
    stages = plan(out, seeds, b, family)
    if base_from is not None:
        adopt_base(base_from, out, stages)
    out.mkdir(parents=True, exist_ok=True)
    compile_once(out)  # the seeds' runs compile the same programs
    results, timings, commands = {}, {}, []
    t_all = time.perf_counter()
    for stage in stages:
        if isinstance(stage, tuple):
            s = stage[1]
            timings[f"seed{s}/upcycle"] = upcycle_stage(out, s, b)
            o = shown(out)
            commands.append(f"python -m unijax.upcycle --base {o}/base/model --und {o}/seed{s}/stage1_und/"
                            f"model --gen {o}/seed{s}/stage1_gen/model --out {o}/seed{s}/upcycled --noise 0.01 "
                            f"--seed {s}")
            continue
        seconds = train_stage(stage, out)
        copied = json.loads((out / stage.name / "DONE").read_text()).get("copied_from")
        timings[stage.name + (f" (copied from {shown(copied)})" if copied else "")] = seconds
        commands.append(stage.command(out))
        if stage.evaluate:
            t0 = time.perf_counter()
            seed = int(stage.overrides.get("seed", 0))
            results[stage.name] = evaluate_model(out / stage.name / "model", b, seed)
            timings[stage.name + " (eval)"] = _first_seconds(out / stage.name / "eval" / "SECONDS", t0)
            commands.append(f"python -m unijax.evaluate --ckpt {shown(out / stage.name / 'model')} --suite shapes_pope "
                            f"--num_images {b.pope_images} --seed {seed}  # and shapes_mc, shapes_geneval")
            print(f"== {stage.name}: " + " ".join(f"{k}={v:.3f}" for k, v in results[stage.name].items()), flush=True)
    t0 = time.perf_counter()
    analysis = analyse(out, seeds, b.intensity_samples, b.conflict_batches)
    timings["analysis (intensity, conflict)"] = _first_seconds(out / f"ANALYSIS_SECONDS_seeds{'-'.join(map(str, seeds))}", t0)
    report = write_report(out, results, timings, commands, seeds, quick, b, argv, family, analysis)
    print(f"\nwrote {report} ({(time.perf_counter() - t_all) / 60:.1f} min)")
    print(report.read_text())
    return report
