"""Serve a model checkpoint: an OpenAI-compatible HTTP API and a web page (chat about images, generate them).

    python -m unijax.serve --ckpt workdir/stage2/model [--host 127.0.0.1 --port 8000]

`--ckpt` takes what `generate` takes: `<workdir>/model` of any stage (dense or TA-MoE, LoRA merged),
a LoRA adapter directory, a converted Janus-Pro or Emu3 model. Every program a request can reach is
compiled at start-up (per `--batch_sizes` and `--lengths`, with progress), so no request waits for a
compile. Requests that arrive together share a decode batch. The API is in docs/serving.md; the page
is at `/`, the API's schema at `/docs`.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import uvicorn
from flax import nnx

from unijax import cli
from unijax.inference.engine import Engine
from unijax.models.config import family_of
from unijax.serving.server import ServeOptions, create_app


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unijax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model checkpoint directory (any kind `generate` takes)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="", help="the model's name in the API (default: the checkpoint's directory)")
    p.add_argument("--batch_sizes", type=_ints, default=(1, 4, 8), help="compiled decode batch sizes")
    p.add_argument("--lengths", type=_ints, default=None,
                   help="compiled prompt lengths (default: one image + 96 tokens, and --max_images images + 256)")
    p.add_argument("--max_tokens", type=int, default=256,
                   help="answer tokens a request may ask for (an answer's KV cache: its prompt length + this)")
    p.add_argument("--max_n", type=int, default=16, help="images a generation request may ask for")
    p.add_argument("--max_images", type=int, default=4, help="images in one conversation")
    p.add_argument("--max_request_bytes", type=int, default=16 << 20, help="largest request body")
    p.add_argument("--max_image_pixels", type=int, default=16_000_000, help="largest image, checked before decoding")
    p.add_argument("--image_dir", default=None, help="allow image URLs naming local files under this directory")
    p.add_argument("--no_routing", action="store_true", help="TA-MoE: no routing statistics per request")
    p.add_argument("--group", choices=("router", "label"), default="router", help="TA-MoE expert group choice")
    p.add_argument("--tokenizer", default=None, help="'shapes' or a transformers tokenizer directory")
    p.add_argument("--data_dir", default=None, help="where the shapes tokenizer is cached")
    return p


def model_info(engine, ckpt) -> dict:
    """What the page shows: family, stage (the run directory), FFN and experts, parameters."""
    cfg = engine.cfg
    ckpt = pathlib.Path(ckpt).absolute()
    info = {"family": family_of(cfg), "stage": ckpt.parent.name if ckpt.name in ("model", "adapters") else ckpt.name,
            "ffn": cfg.ffn, "checkpoint": str(ckpt),
            "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(engine.model, nnx.Param))))}
    if cfg.ffn == "ta_moe":
        info["experts"] = {"per_group": cfg.moe.num_experts_per_group, "top_k": cfg.moe.top_k,
                           "moe_layers": sum(cfg.moe.is_moe_layer(i) for i in range(cfg.text.num_layers)),
                           "group_assignment": cfg.moe.group_assignment}
    return info


def build(args):
    """(app, server) for `args`, warmed up and with its batcher running."""
    engine = Engine.load(args.ckpt, tokenizer=args.tokenizer, data_dir=args.data_dir, group=args.group,
                         batch_size=max(args.batch_sizes))
    lengths = args.lengths or (_round(engine.und_tokens + 96), _round(args.max_images * engine.und_tokens + 256))
    options = ServeOptions(
        model_name=args.name or _name(args.ckpt), batch_sizes=tuple(args.batch_sizes), lengths=tuple(lengths),
        max_tokens=args.max_tokens, max_n=args.max_n,
        max_images=args.max_images, max_request_bytes=args.max_request_bytes, max_image_pixels=args.max_image_pixels,
        image_dir=args.image_dir, routing=not args.no_routing)
    app = create_app(engine, options, model_info(engine, args.ckpt))
    server = app.state.server
    t0 = time.perf_counter()

    def progress(i, n, what):
        elapsed = time.perf_counter() - t0
        eta = f", ETA {elapsed / i * (n - i):.0f} s" if 0 < i < n else ""
        print(f"\rcompiling {i}/{n}: {what} ({elapsed:.0f} s{eta})" + " " * 8, end="" if i < n else "\n", flush=True)

    server.batcher.warm_up(progress)
    server.batcher.start()
    return app, server


def _round(n: int, m: int = 64) -> int:
    return -(-n // m) * m


def _name(ckpt) -> str:
    p = pathlib.Path(ckpt).absolute()
    return f"{p.parent.name}/{p.name}" if p.name in ("model", "adapters") else p.name


def main(argv=None):
    args = parser().parse_args(argv)
    for name in ("max_tokens", "max_n", "max_images", "max_request_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            parser().error(f"--{name} must be >= 1")
    try:
        app, server = build(args)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    print(f"serving {server.options.model_name} at http://{args.host}:{args.port}/ (API: /v1, schema: /docs)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.batcher.stop()
    return 0


if __name__ == "__main__":
    cli.run_argparse(main)
