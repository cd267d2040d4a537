"""Benchmark evaluation of a model checkpoint: `python -m unijax.evaluate --ckpt CKPT --suite NAME`.

    python -m unijax.evaluate --ckpt workdir/stage2/model --suite shapes_pope [--num_images 100]
    python -m unijax.evaluate --ckpt workdir/stage2/model --suite shapes_mc [--num_questions 200]
    python -m unijax.evaluate --ckpt workdir/stage2/model --suite shapes_geneval [--per_tag 10 --samples 4]
    python -m unijax.evaluate --ckpt CKPT --suite pope --files coco_pope_random.json,coco_pope_popular.json \\
        --image_root val2014/
    python -m unijax.evaluate --ckpt CKPT --suite mmmu --files validation.parquet [--image_root DIR]
    python -m unijax.evaluate --ckpt CKPT --suite geneval --files evaluation_metadata.jsonl
    python -m unijax.evaluate --ckpt CKPT --suite files --data heldout.jsonl,heldout_captions.parquet [--image_root DIR]

Suites and metrics: `unijax.inference.suites`; file formats: `unijax.data.benchmarks`. Writes
`--out` (default `<CKPT>/../eval/<suite>`): `results.json`, `results.md` (the metrics table, also
printed), `predictions.jsonl` (one line per item), `suite.json` (the settings) and for generation
suites `images/<k:05d>/` in GenEval's layout (`metadata.jsonl`, `samples/0000.png`, ...), which
GenEval's own `evaluate_images.py` scores as it is. A killed evaluation resumes where it stopped
when rerun with the same command; other settings into the same `--out` are refused unless
`--overwrite`.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys
import time

from unijax import cli
from unijax.inference import suites
from unijax.inference.engine import Engine, default_out
from unijax.inference.suites import SUITES, Options


def parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m unijax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model checkpoint directory")
    p.add_argument("--suite", required=True, choices=SUITES)
    p.add_argument("--out", default="", help="output directory (default <CKPT>/../eval/<suite>)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier evaluation in --out")
    p.add_argument("--seed", type=int, default=d.seed, help="held-out scene seed (shapes) and sampling seed")
    p.add_argument("--num_images", type=int, default=d.num_images, help="shapes_pope: images")
    p.add_argument("--num_questions", type=int, default=d.num_questions, help="shapes_mc: questions")
    p.add_argument("--per_tag", type=int, default=d.per_tag, help="shapes_geneval: prompts per tag")
    p.add_argument("--samples", type=int, default=d.samples, help="generation: images per prompt")
    p.add_argument("--cfg", type=float, default=d.cfg, help="generation: classifier-free guidance scale")
    p.add_argument("--temperature", type=float, default=d.temperature, help="generation temperature")
    p.add_argument("--top_k", type=int, default=d.top_k)
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens, help="understanding answers")
    p.add_argument("--files", "--data", dest="files", default="",
                   help="pope / mmmu / geneval: comma-separated benchmark files; files: your held-out data files")
    p.add_argument("--image_root", default="", help="pope / mmmu: the image folder")
    p.add_argument("--split", default=d.split, help="mmmu: the split read from folders of subjects")
    p.add_argument("--pope_instruction", default=d.pope_instruction,
                   help="pope: appended to every question on a new line ('' for the bare question)")
    p.add_argument("--batch_size", type=int, default=16, help="rows decoded together")
    p.add_argument("--group", choices=("router", "label"), default="router", help="TA-MoE expert group choice")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--data_dir", default=None)
    return p


class Progress:
    """`[suite] 96/400 items  24%  12.3 items/s  eta 0:00:25` on one console line."""

    def __init__(self, name: str):
        self.name, self.t0, self.first = name, time.perf_counter(), None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, now)
        d0, t0 = self.first
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        eta = (total - done) / rate if rate else 0.0
        end = "\n" if done >= total else ""
        print(f"\r[{self.name}] {done}/{total} items {100 * done / total:3.0f}%  {rate:.1f} items/s  "
              f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", end=end, file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    args = parser().parse_args(argv)

    o = suites.Options(seed=args.seed, num_images=args.num_images, num_questions=args.num_questions,
                       per_tag=args.per_tag, samples=args.samples, cfg=args.cfg, temperature=args.temperature,
                       top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                       files=tuple(f for f in args.files.split(",") if f), image_root=args.image_root,
                       split=args.split, pope_instruction=args.pope_instruction)
    for key in ("num_images", "num_questions", "per_tag", "samples", "batch_size", "max_new_tokens"):
        if getattr(args, key) < 1:
            parser().error(f"--{key} must be >= 1")
    out = pathlib.Path(args.out) if args.out else default_out(args.ckpt, "eval") / args.suite
    try:
        engine = Engine.load(args.ckpt, tokenizer=args.tokenizer, data_dir=args.data_dir, group=args.group,
                             batch_size=args.batch_size)
        o = dataclasses.replace(o, size=engine.image_size)
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        m = suites.run(args.suite, engine, o, out, chunk=args.batch_size * 4, progress=Progress(args.suite),
                       fingerprint={"checkpoint": str(pathlib.Path(args.ckpt).absolute()), "group": args.group})
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)  # error: <e>, exit 2 (the traceback under --verbosity=1)
    print((out / "results.md").read_text(), end="")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return m


if __name__ == "__main__":
    cli.run_argparse(main)
