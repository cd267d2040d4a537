"""Online (iterative) DPO on the shapes world, where the detector is an exact judge.

Each round starts from the previous round's model:
1. generation: `samples` images for each of `prompts` training prompts (`shapes.prompt_set` at a
   training seed, never the held-out one) with CFG; each scored by the GenEval rule's share of
   checks that hold (`shapes.partial_score`); ranked by score, a prompt's i-th best and i-th worst
   samples make pair i (`pairs_per_prompt` at most) when their scores differ;
2. understanding: `samples` sampled answers (temperature 1) to each of `questions` questions about
   training scenes, judged against the scene's ground truth; a right and a wrong answer make a pair;
3. the pairs are written as align-anything files (`pairs.jsonl`, PNGs beside it) and trained on
   with `train.objective=dpo` (configs/dpo.py: fresh LoRA adapters whose adapters-off model, the
   round's start, is the reference) for `steps` steps; the images' codes scored under the CFG they
   were sampled with (`dpo.guidance`).
With `truth_chosen`, a prompt none of whose samples passes pairs its rendered scene (chosen) with
its worst sample, and a question nobody answered right pairs the true answer with a wrong one: the
data against the model's own samples, as SPIN pairs them.
Held-out `shapes_geneval` and `shapes_pope` are measured before the first round and after the
last; `report.json`, `report.md` and `curve.png` go to the output folder.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from unijax.analysis.recipe import compile_once
from unijax.data import shapes
from unijax.data.records import encode_png
from unijax.inference import suites
from unijax.inference.engine import Engine
from unijax.inference.sampling import Sampling
from unijax.io import write_outputs
from unijax.training import loop
from unijax.training.config import validate

TRAIN_SEED = 20_000  # prompt / scene seeds of the loop's own samples (the suites use their held-out seed)


def generation_pairs(engine: Engine, folder: pathlib.Path, *, seed: int, prompts: int, samples: int,
                     cfg: float, truth_chosen: bool = False, per_prompt: int = 1) -> tuple[list[dict], float]:
    """-> (align-anything t2i records, the share of samples GenEval's rule passes). A prompt's
    samples ranked by score, its i-th best and i-th worst make pair i (`per_prompt` pairs at most,
    only where the scores differ). `truth_chosen`: when no sample of a prompt passes, the rendered
    scene the prompt was drawn from is the chosen side against the worst sample (self-play against
    the data, as SPIN pairs them)."""
    per_tag = max(1, prompts // len(shapes.TAGS))
    items = shapes.prompt_set(seed, per_tag, engine.image_size)
    images = engine.images([p for p, _, _ in items], num_images=samples, guidance=cfg,
                           sampling=Sampling(temperature=1.0), seed=seed)
    records, passed = [], 0
    for i, ((prompt, spec, scene), imgs) in enumerate(zip(items, images)):
        dets = [shapes.detect(img) for img in imgs]
        scores = [shapes.partial_score(spec, d) for d in dets]
        passed += sum(shapes.score(spec, d) for d in dets)
        order = np.argsort(scores, kind="stable")  # worst first
        for j in range(min(per_prompt, len(order) // 2)):
            best, worst = int(order[-1 - j]), int(order[j])
            chosen = imgs[best]
            if truth_chosen and scores[best] < 1.0:
                if j:
                    break
                chosen = shapes.render(scene)
            elif scores[best] == scores[worst]:
                break
            names = [f"gen_{i:04d}_{j}_chosen.png", f"gen_{i:04d}_{j}_rejected.png"]
            for name, img in zip(names, (chosen, imgs[worst])):
                (folder / name).write_bytes(encode_png(img))
            records.append({"prompt": prompt, "better_image": names[0], "worse_image": names[1]})
    return records, passed / max(1, len(items) * samples)


def understanding_pairs(engine: Engine, folder: pathlib.Path, *, seed: int, questions: int,
                        samples: int, truth_chosen: bool = False) -> tuple[list[dict], float]:
    """-> (align-anything ti2t records, the share of sampled answers that are right). `truth_chosen`:
    the true answer is the chosen side when no sample gives it."""
    rng = np.random.default_rng([seed, 3])
    scenes = [shapes.sample_scene(rng, engine.image_size) for _ in range(questions)]
    qas = [shapes.sample_question(s, rng) for s in scenes]
    images = [shapes.render(s) for s in scenes]
    answers = [engine.answer(images, [qa.question for qa in qas], sampling=Sampling(temperature=1.0),
                             seed=seed * 100 + k) for k in range(samples)]
    records, right = [], 0
    for i, qa in enumerate(qas):
        said = [a[i].strip() for a in answers]
        good = [a for a in said if a == qa.answer]
        bad = [a for a in said if a and a != qa.answer]
        right += len(good)
        if truth_chosen and not good:
            good = [qa.answer]
        if not good or not bad:
            continue
        name = f"und_{i:04d}.png"
        (folder / name).write_bytes(encode_png(images[i]))
        records.append({"question": qa.question, "image": name, "better_response": good[0],
                        "worse_response": bad[0]})
    return records, right / max(1, questions * samples)


def round_config(base, init_from: str, pairs: str, image_root: str, workdir: str, steps: int, task: str,
                 guidance: float | None = None):
    """The DPO config of one round: `base` on the round's pairs, from the round's start model;
    `guidance`: image codes scored under the CFG the images were sampled with (`dpo.guidance`)."""
    c = base.copy_and_resolve_references()
    with c.unlocked():
        if guidance is not None:
            c.dpo.guidance = float(guidance)
        c.init_from, c.init_recipe, c.workdir = init_from, "", workdir
        c.model.preset = "checkpoint"  # the start model's own architecture
        c.data.source, c.data.pref_jsonl, c.data.pref_image_root = "files", pairs, image_root
        c.data.eval_split = 0.0
        c.train.steps = steps
        c.train.warmup_steps = min(c.train.warmup_steps, max(steps // 4, 1))
        c.train.checkpoint_every = steps
        c.train.eval_at_start = False
        c.eval.evaluators = ()
        if task != "both":
            c.data.und_ratio, c.data.gen_ratio = (1.0, 0.0) if task == "und" else (0.0, 1.0)
    validate(c)
    return c


def held_out(engine: Engine, per_tag: int, samples: int, pope_images: int, cfg: float) -> dict[str, float]:
    gen = suites.run("shapes_geneval", engine, suites.Options(per_tag=per_tag, samples=samples, cfg=cfg,
                                                              size=engine.image_size))
    pope = suites.run("shapes_pope", engine, suites.Options(num_images=pope_images, size=engine.image_size))
    return {"shapes_geneval": float(gen["overall"]), "shapes_pope": float(pope["average"]["accuracy"])}


def run(ckpt: str, out: pathlib.Path, train_config, *, rounds: int = 4, task: str = "both", prompts: int = 48,
        questions: int = 64, samples: int = 4, steps: int = 40, cfg: float = 5.0, eval_per_tag: int = 8,
        eval_samples: int = 4, pope_images: int = 100, truth_chosen: bool = False, pairs_per_prompt: int = 1,
        log=print) -> dict:
    """The loop (module docstring). `train_config(init_from, pairs_file, image_root, workdir, steps)`
    returns the DPO training config of a round."""
    out.mkdir(parents=True, exist_ok=True)
    compile_once(out)  # every round compiles the same sampler and train step
    t0 = time.perf_counter()
    loop_seconds = 0.0
    engine = Engine.load(ckpt)
    before = held_out(engine, eval_per_tag, eval_samples, pope_images, cfg)
    log(f"start {ckpt}: {before}")
    current, history = ckpt, []
    for r in range(rounds):
        t_round = time.perf_counter()
        folder = out / f"round{r}"
        folder.mkdir(exist_ok=True)
        engine = Engine.load(current) if r else engine
        seed = TRAIN_SEED + r
        recs, stats = [], {"round": r}
        if task in ("gen", "both"):
            gen, stats["gen_pass"] = generation_pairs(engine, folder, seed=seed, prompts=prompts, samples=samples,
                                                      cfg=cfg, truth_chosen=truth_chosen,
                                                      per_prompt=pairs_per_prompt)
            recs += gen
            stats["gen_pairs"] = len(gen)
        if task in ("und", "both"):
            und, stats["und_right"] = understanding_pairs(engine, folder, seed=seed, questions=questions,
                                                          samples=samples, truth_chosen=truth_chosen)
            recs += und
            stats["und_pairs"] = len(und)
        if not recs:
            log(f"round {r}: no pair (every sample scored the same); stopping")
            break
        (folder / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
        c = train_config(current, str(folder / "pairs.jsonl"), str(folder), str(folder / "train"), steps)
        metrics = loop.train(c)
        current = str(folder / "train" / "model")
        loop_seconds += time.perf_counter() - t_round
        stats.update(minutes=loop_seconds / 60, reward_accuracy=float(metrics.get("reward_accuracy", np.nan)),
                     reward_margin=float(metrics.get("reward_margin", np.nan)))
        history.append(stats)
        log(f"round {r}: {stats}")
    after = held_out(Engine.load(current), eval_per_tag, eval_samples, pope_images, cfg)
    report = {"start": ckpt, "final": current, "before": before, "after": after, "rounds": history,
              "loop_minutes": loop_seconds / 60, "total_minutes": (time.perf_counter() - t0) / 60,
              "settings": dict(rounds=rounds, task=task, prompts=prompts, questions=questions, samples=samples,
                               steps=steps, cfg=cfg, eval_per_tag=eval_per_tag, eval_samples=eval_samples,
                               truth_chosen=truth_chosen, pairs_per_prompt=pairs_per_prompt)}
    write_outputs(out, {"report.json": lambda p: p.write_text(json.dumps(report, indent=2) + "\n"),
                        "report.md": lambda p: p.write_text(markdown(report)),
                        "curve.png": lambda p: plot(history, p)})
    log(f"after {len(history)} rounds ({loop_seconds / 60:.1f} min of loop): {after}")
    return report


def markdown(r: dict) -> str:
    lines = ["| round | gen pairs | gen pass (train prompts) | und pairs | und right (sampled) | reward acc | "
             "loop min |", "|---|---|---|---|---|---|---|"]
    for h in r["rounds"]:
        lines.append(f"| {h['round']} | {h.get('gen_pairs', '-')} | {h.get('gen_pass', float('nan')):.3f} | "
                     f"{h.get('und_pairs', '-')} | {h.get('und_right', float('nan')):.3f} | "
                     f"{h['reward_accuracy']:.2f} | {h['minutes']:.1f} |")
    b, a = r["before"], r["after"]
    lines += ["", "| held out | before | after |", "|---|---|---|",
              f"| shapes_geneval | {b['shapes_geneval']:.3f} | {a['shapes_geneval']:.3f} |",
              f"| shapes_pope accuracy | {b['shapes_pope']:.3f} | {a['shapes_pope']:.3f} |"]
    return "\n".join(lines) + "\n"


def plot(history: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [0.0] + [h["minutes"] for h in history[:-1]]  # a round's samples come from the model it starts with
    for key, label in (("gen_pass", "GenEval pass, sampled (train prompts)"),
                       ("und_right", "answers right, sampled (train scenes)")):
        if history and key in history[0]:
            ax.plot(x, [h[key] for h in history], marker="o", label=label)
    ax.set_xlabel("loop minutes (CPU) before the round")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
