"""Online (iterative) DPO on the shapes world: sample, judge with the shapes detector, pair, train.

    python -m unijax.online_dpo --ckpt workdir/stage2/model --out workdir/online_dpo \\
        [--config configs/dpo.py --config.dpo.sft_weight=1.0] [--rounds 8 --task gen --samples 16]

Every round samples from the current model and pairs, per prompt, its best samples with its worst
(generation: the share of GenEval's checks that hold, `--pairs_per_prompt` pairs; understanding: a
right against a wrong answer), then trains `train.objective=dpo` on the pairs from the round's start
model (the `--config` DPO settings; its LoRA adapters off are the reference; image codes scored
under the sampling CFG, `--guided`). Held-out `shapes_geneval` and `shapes_pope` before and after;
`report.json`, `report.md` and `curve.png` in `--out` (`unijax.analysis.online_dpo`).
"""

from __future__ import annotations

import pathlib

from absl import app, flags
from ml_collections import config_flags

from unijax import cli
from unijax.analysis import online_dpo

FLAGS = flags.FLAGS
_CONFIG = None


def _define_flags():
    """Defined when run as a script only, so that importing this module adds no absl flags."""
    global _CONFIG
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/dpo.py", "the DPO config of every round",
                                              lock_config=True)
    flags.DEFINE_string("ckpt", None, "the model checkpoint to start from", required=True)
    flags.DEFINE_string("out", "workdir/online_dpo", "output folder (rounds, report)")
    flags.DEFINE_integer("rounds", 8, "sample-judge-train rounds")
    flags.DEFINE_enum("task", "both", ["gen", "und", "both"], "which task's samples make pairs")
    flags.DEFINE_integer("prompts", 48, "generation prompts per round (balanced over the six GenEval tags)")
    flags.DEFINE_integer("questions", 64, "understanding questions per round")
    flags.DEFINE_integer("samples", 16, "samples per prompt / question")
    flags.DEFINE_integer("steps", 12, "DPO steps per round")
    flags.DEFINE_float("cfg", 5.0, "classifier-free guidance of the sampled and evaluated images")
    flags.DEFINE_integer("eval_per_tag", 8, "held-out shapes_geneval prompts per tag (x --eval_samples images)")
    flags.DEFINE_integer("eval_samples", 4, "held-out shapes_geneval images per prompt")
    flags.DEFINE_integer("pope_images", 100, "held-out shapes_pope images (up to 4 questions each)")
    flags.DEFINE_integer("pairs_per_prompt", 2, "generation pairs per prompt: its i-th best sample against its i-th "
                         "worst, where their scores differ")
    flags.DEFINE_bool("guided", True, "score the sampled images' codes under the CFG they were sampled with "
                      "(dpo.guidance = --cfg); --noguided: under the conditional model (--config.dpo.guidance)")
    flags.DEFINE_bool("truth_chosen", False, "when no sample of a prompt passes, pair the prompt's rendered scene "
                      "(chosen) with the worst sample (SPIN-style); default: best against worst sample only")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = FLAGS
    for name in ("rounds", "prompts", "questions", "samples", "steps", "pairs_per_prompt"):
        if getattr(f, name) < 1:
            raise app.UsageError(f"--{name}={getattr(f, name)} must be >= 1")
    base = _CONFIG.value
    if base.train.objective != "dpo":
        raise app.UsageError(f"--config: train.objective={base.train.objective!r}; the loop trains dpo")

    def train_config(init_from, pairs, image_root, workdir, steps):
        return online_dpo.round_config(base, init_from, pairs, image_root, workdir, steps, f.task,
                                       guidance=f.cfg if f.guided else None)

    online_dpo.run(f.ckpt, pathlib.Path(f.out), train_config, rounds=f.rounds, task=f.task, prompts=f.prompts,
                   questions=f.questions, samples=f.samples, steps=f.steps, cfg=f.cfg, eval_per_tag=f.eval_per_tag,
                   eval_samples=f.eval_samples, pope_images=f.pope_images, truth_chosen=f.truth_chosen,
                   pairs_per_prompt=f.pairs_per_prompt)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
