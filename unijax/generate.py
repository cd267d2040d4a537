"""Generation from a model checkpoint: images from prompts (T2I) and answers about images (MMU).

    python -m unijax.generate --ckpt workdir/stage2/model --prompt "a red circle" [--prompt ...]
        [--num_images 4] [--cfg 5.0] [--temperature 1.0] [--top_k 0] [--top_p 1.0] [--seed 0]
        [--out grid.png]
    python -m unijax.generate --ckpt workdir/stage2/model --image scene.png --question "how many circles are there?"
        [--question ...] [--temperature 0]

T2I writes one PNG grid (a row per prompt, `--num_images` samples per row, upscaled with nearest
neighbour to at least `--min_px` pixels per image) to `--out` (default `<CKPT>/../samples/t2i.png`)
and a JSON beside it with the prompts and settings. MMU prints one answer per question (greedy by
default). `--ckpt` takes every checkpoint kind: `<workdir>/model` of any stage (dense or TA-MoE, LoRA
merged), a LoRA adapter directory (`<workdir>/adapters`, merged on load) or a converted Janus-Pro.
TA-MoE models route by their task router (`--group router`) unless `--group label`. The tokenizer
is the run's (`<CKPT>/../config.json` `data.tokenizer`) unless `--tokenizer` names one.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np

from unijax import cli
from unijax.data import records
from unijax.inference.engine import Engine, default_out
from unijax.inference.images import save_grid
from unijax.inference.sampling import Sampling
from unijax.io import write_outputs

MAX_IMAGES = 1024  # images of one `generate` call (one PNG grid)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unijax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="T2I prompt (repeatable)")
    p.add_argument("--num_images", type=int, default=4, help="samples per prompt")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--image", action="append", default=[], help="MMU image file (one, or one per question)")
    p.add_argument("--question", action="append", default=[], help="MMU question (repeatable)")
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; default 1.0 for images, 0 (greedy) for answers")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="T2I grid PNG (default <CKPT>/../samples/t2i.png)")
    p.add_argument("--min_px", type=int, default=128, help="grid images are upscaled to at least this size")
    p.add_argument("--batch_size", type=int, default=8, help="rows decoded together")
    p.add_argument("--group", choices=("router", "label"), default="router", help="TA-MoE expert group choice")
    p.add_argument("--tokenizer", default=None, help="'shapes' or a transformers tokenizer directory")
    p.add_argument("--data_dir", default=None, help="where the shapes tokenizer is cached")
    return p


def load_image(path, limits: records.ImageLimits = records.DEFAULT_LIMITS) -> np.ndarray:
    """`--image`: a regular file within `limits` (pixels checked from the header before decoding)."""
    try:
        return records.decode_image(records.read_image_bytes(str(path), limits), limits.max_pixels)
    except FileNotFoundError:
        raise ValueError(f"--image {path}: no such file") from None
    except Exception as e:  # PIL raises many types for bad data (a decompression bomb included)
        raise ValueError(f"--image {path}: not a readable image ({type(e).__name__}: {e})") from None


def upscale(images: np.ndarray, min_px: int) -> np.ndarray:
    """Nearest-neighbour upscaling of `[..., H, W, C]` by the smallest integer factor reaching `min_px`."""
    f = max(1, -(-min_px // images.shape[-2]))
    return images.repeat(f, axis=-3).repeat(f, axis=-2)


def run_t2i(engine, args) -> pathlib.Path:
    sampling = Sampling(temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                        top_p=args.top_p)
    images = engine.images(args.prompt, num_images=args.num_images, guidance=args.cfg, sampling=sampling,
                           seed=args.seed)
    out = pathlib.Path(args.out) if args.out else default_out(args.ckpt, "samples") / "t2i.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = upscale(images, args.min_px).reshape(-1, *upscale(images[:1, :1], args.min_px).shape[2:])
    meta = {"checkpoint": str(pathlib.Path(args.ckpt).absolute()), "prompts": args.prompt,
            "num_images": args.num_images, "cfg": args.cfg, "temperature": sampling.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "rows": "one per prompt"}
    # the grid and its metadata, each written beside its target and renamed into place together: an
    # interrupted run leaves no half PNG
    write_outputs(out.parent, {out.name: lambda p: save_grid(grid, p, cols=args.num_images),
                               out.with_suffix(".json").name: lambda p: p.write_text(json.dumps(meta, indent=2) + "\n")})
    print(f"wrote {out} ({len(args.prompt)} prompts x {args.num_images} images)")
    return out


def run_mmu(engine, args) -> list[str]:
    if len(args.image) not in (1, len(args.question)):
        raise ValueError(f"{len(args.image)} --image for {len(args.question)} --question: give one image, "
                         f"or one per question")
    images = [load_image(p) for p in args.image]
    images = images * len(args.question) if len(images) == 1 else images
    sampling = Sampling(temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p)
    answers = engine.answer(images, args.question, max_new_tokens=args.max_new_tokens, sampling=sampling,
                            seed=args.seed)
    for q, a in zip(args.question, answers):
        print(f"Q: {q}\nA: {a}")
    return answers


def main(argv=None):
    args = parser().parse_args(argv)
    if not args.prompt and not args.question:
        parser().error("give --prompt (text-to-image) or --image with --question (understanding)")
    if args.question and not args.image:
        parser().error("--question needs --image")
    if args.num_images < 1 or args.batch_size < 1:
        parser().error("--num_images and --batch_size must be >= 1")
    if args.num_images * max(len(args.prompt or ()), 1) > MAX_IMAGES:
        parser().error(f"--num_images={args.num_images} x {len(args.prompt)} prompts is more than {MAX_IMAGES} images "
                       f"in one grid; run several times with --seed")
    for name in ("cfg", "temperature", "top_p"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            parser().error(f"--{name}={value} must be a finite number >= 0")

    try:
        engine = Engine.load(args.ckpt, tokenizer=args.tokenizer, data_dir=args.data_dir, group=args.group,
                             batch_size=args.batch_size)
        result = {}
        if args.prompt:
            result["grid"] = str(run_t2i(engine, args))
        if args.question:
            result["answers"] = run_mmu(engine, args)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)  # error: <e>, exit 2 (the traceback under --verbosity=1)
    return result


if __name__ == "__main__":
    cli.run_argparse(main)
