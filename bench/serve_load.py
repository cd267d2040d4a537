"""Load on `python -m unijax.serve`: 32 concurrent clients against sequential `generate` calls.

    python bench/serve_load.py --ckpt workdir/stage2/model      # the main job's model
    python bench/serve_load.py                                  # a random tiny TA-MoE model (~2 min)

The server (`unijax.serve.build`: every program compiled at start-up) runs under uvicorn on the
loopback. `--clients` threads send `--requests` requests in a fixed mix: a third questions about a
shapes scene, a third the same streamed, a third image generations of 1 or 2 images (the main job's
tasks). Reported: p50 / p95 latency, throughput, the mean rows per decode batch. The reference is the
same requests one after another through the engine `generate` uses (`Engine.answer` /
`Engine.images`, batch size 1 and the request's own images), after one untimed call of each kind so
that compiling is excluded on both sides. Prints a Markdown table and writes `--json` (default
bench/results/serve_load.json).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import requests  # noqa: E402


def tiny_checkpoint(root: pathlib.Path) -> pathlib.Path:
    sys.path.insert(0, str(REPO / "tests"))
    from test_serve import save_run, ta_moe_cfg

    return save_run(root, ta_moe_cfg())


def workload(n: int):
    from unijax.data import shapes

    questions = ["what colour is the circle?", "how many squares are there?", "what shape is the red object?",
                 "is there a blue circle in the image?"]
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append({"kind": "image", "prompt": shapes.t2i_prompt(shapes.scene_at(2, i), np.random.default_rng(i))[0],
                        "n": 1 + i % 2, "seed": i})
        else:
            out.append({"kind": "chat", "image": shapes.render(shapes.scene_at(2, i)), "question": questions[i % 4],
                        "stream": i % 3 == 1})
    return out


def data_url(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def send(base: str, req: dict, max_tokens: int) -> float:
    t = time.perf_counter()
    if req["kind"] == "image":
        r = requests.post(base + "/v1/images/generations", json={"prompt": req["prompt"], "n": req["n"], "seed": req["seed"]},
                          timeout=600)
        r.raise_for_status()
        assert len(r.json()["data"]) == req["n"]
    else:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(req["image"])}},
                                                          {"type": "text", "text": req["question"]}]}],
                "max_tokens": max_tokens, "stream": req["stream"]}
        r = requests.post(base + "/v1/chat/completions", json=body, stream=req["stream"], timeout=600)
        r.raise_for_status()
        if req["stream"]:
            assert any(line == b"data: [DONE]" for line in r.iter_lines())
        else:
            r.json()
    return time.perf_counter() - t


def sequential(ckpt, reqs, max_tokens: int) -> dict:
    """Seconds for the requests one at a time through `generate`'s engine (compiles excluded), per kind."""
    from unijax.inference.engine import Engine
    from unijax.inference.sampling import Sampling

    engine = Engine.load(ckpt, batch_size=1)

    def run(req):
        if req["kind"] == "image":
            engine.images([req["prompt"]], num_images=req["n"], guidance=5.0, sampling=Sampling(temperature=1.0),
                          seed=req["seed"])
        else:
            engine.answer([req["image"]], [req["question"]], max_new_tokens=max_tokens)

    for req in (reqs[0], reqs[2]):  # compile each kind once, untimed
        run(req)
    spent = {"chat": 0.0, "image": 0.0}
    for req in reqs:
        t = time.perf_counter()
        run(req)
        spent[req["kind"]] += time.perf_counter() - t
    return spent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="", help="checkpoint to serve (default: a random tiny TA-MoE model)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--max_tokens", type=int, default=16)
    p.add_argument("--batch_sizes", default="1,4,8,16")
    p.add_argument("--no_routing", action="store_true", help="serve without TA-MoE routing statistics")
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "serve_load.json"))
    args = p.parse_args(argv)

    import uvicorn

    from unijax import serve

    tmp = tempfile.TemporaryDirectory()
    ckpt = pathlib.Path(args.ckpt) if args.ckpt else tiny_checkpoint(pathlib.Path(tmp.name))
    t0 = time.perf_counter()
    app, server = serve.build(serve.parser().parse_args(["--ckpt", str(ckpt), "--batch_sizes", args.batch_sizes,
                                                         "--max_tokens", str(max(args.max_tokens, 16)),
                                                         *(["--no_routing"] if args.no_routing else [])]))
    startup = time.perf_counter() - t0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    httpd = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=httpd.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            requests.get(base + "/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)

    reqs = workload(args.requests)
    for req in reqs[:3]:  # one of each kind through the server first (connections, routing statistics' compile)
        send(base, req, args.max_tokens)
    before = {k: len(v) for k, v in server.batcher.batches.items()}
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        latencies = list(pool.map(lambda r: send(base, r, args.max_tokens), reqs))
    wall = time.perf_counter() - t
    rows = [n for k, v in server.batcher.batches.items() for n in v[before[k]:]]
    stats = server.batcher.stats()
    httpd.should_exit = True
    server.batcher.stop()
    seq_kinds = sequential(ckpt, reqs, args.max_tokens)
    seq = sum(seq_kinds.values())

    result = {"checkpoint": str(ckpt), "clients": args.clients, "requests": len(reqs), "routing": not args.no_routing,
              "mix": {"chat": sum(r["kind"] == "chat" and not r["stream"] for r in reqs),
                      "chat_stream": sum(r["kind"] == "chat" and r["stream"] for r in reqs),
                      "images": sum(r["kind"] == "image" for r in reqs)},
              "max_tokens": args.max_tokens, "batch_sizes": args.batch_sizes, "startup_compile_s": round(startup, 1),
              "p50_s": round(float(np.percentile(latencies, 50)), 3), "p95_s": round(float(np.percentile(latencies, 95)), 3),
              "wall_s": round(wall, 2), "throughput_rps": round(len(reqs) / wall, 2),
              "mean_batch": round(float(np.mean(rows)), 2), "decode_batches": len(rows),
              "decode_s": {k: stats[f"{k}_decode_s"] for k in ("chat", "image")},
              "sequential_s": round(seq, 2), "sequential_by_kind_s": {k: round(v, 2) for k, v in seq_kinds.items()},
              "sequential_rps": round(len(reqs) / seq, 2),
              "speedup": round(seq / wall, 2)}
    print("| setting | requests | wall (s) | requests/s | p50 (s) | p95 (s) | mean batch |")
    print("|---|---|---|---|---|---|---|")
    print(f"| serve, {args.clients} clients | {len(reqs)} | {wall:.1f} | {result['throughput_rps']} | {result['p50_s']} | "
          f"{result['p95_s']} | {result['mean_batch']} |")
    print(f"| sequential generate | {len(reqs)} | {seq:.1f} | {result['sequential_rps']} | | | 1 |")
    print(f"speedup {result['speedup']}x; start-up compile {startup:.0f} s; decoding (incl. warm-up requests) "
          f"{result['decode_s']['chat']:.1f} s answers, {result['decode_s']['image']:.1f} s images; sequential "
          f"{seq_kinds['chat']:.1f} s answers, {seq_kinds['image']:.1f} s images")
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
