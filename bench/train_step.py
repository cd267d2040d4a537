"""Train-step time, peak memory and matmul utilisation: unijax against transformers (+ PEFT).

    python bench/train_step.py                         # tiny and 100m, dense / stage1 / stage2, 3 interleaved repeats
    python bench/train_step.py --sizes tiny --steps 3 --repeats 1

The step is the decoder's language-modelling step on `--batch` x `--seq` text tokens (cross-entropy
over every position, AdamW), the compute every training stage spends its time in, on the same
LLaMA config in both frameworks:
- unijax: the `Janus` decoder and text head through the training machinery (`split_trainable`
  from the stage's trainable / frozen regexes, optax AdamW, LoRA attached in activation form by `steps.merged_model`), one jitted
  step with donated state;
- transformers: `LlamaForCausalLM` (the architecture of Janus-Pro's language model) with
  `torch.optim.AdamW` on the trainable parameters; stage 2 through PEFT's `get_peft_model`.
Steps: `dense` (everything trains), `stage1` (the FFNs train, attention and the rest frozen, as
`configs/stage1_*.py`), `stage2` (every weight frozen, LoRA rank 16 / alpha 32 on q, k, v, o and
the FFN matrices, as `configs/stage2.py` does on the dense base).

Each (framework, size, step) runs in its own process (`--one`): warm-up steps, then the median of
`--steps` timed steps, and the process's peak resident memory (`ru_maxrss`, model + optimizer +
activations + runtime). The whole set runs `--repeats` times, transformers and unijax alternating
row by row, and the table reports each case's median over the repeats (the ratio moves with the
machine's load; interleaving exposes both frameworks to the same load). Model FLOPs per step: `2 N T` forward plus `2 N T` for activation
gradients plus `2 N_trained T` for weight gradients over the matmul parameters N (embeddings
excluded, the LM head included), plus causal attention `(2 + 4) T^2 d` per layer; utilisation is
that over the time, against the float32 matmul rate measured here (2048^3 jnp.dot). Results: a
Markdown table and `--json` (default bench/results/train_step.json).
"""

from __future__ import annotations

import os
import pathlib
import sys

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(_flags)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

SIZES = {
    # the tiny preset's decoder
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32),
    # ~100M parameters (86M in matmuls + 25M embeddings)
    "100m": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                 num_kv_heads=12, head_dim=64),
}
STEPS = ("dense", "stage1", "stage2")
FFN_REGEX = r"language_model/layers/(.*/)?mlp/.*"
LORA_TARGETS = (r"language_model/layers/.*/self_attn/(q|k|v|o)_proj/kernel",
                r"language_model/layers/.*/mlp/(gate|up|down)_proj/kernel")
RANK, ALPHA = 16, 32.0


def matmul_params(c: dict) -> dict:
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_layers"]
    attn = d * c["num_heads"] * c["head_dim"] * 2 + d * c["num_kv_heads"] * c["head_dim"] * 2
    ffn = 3 * d * f
    return {"attention": L * attn, "ffn": L * ffn, "head": d * c["vocab_size"]}


def model_flops(c: dict, step: str, tokens: int, seq: int, batch: int) -> float:
    n = matmul_params(c)
    total = sum(n.values())
    trained = {"dense": total, "stage1": n["ffn"], "stage2": 0}[step]
    lora = 0
    if step == "stage2":  # A (in x r) and B (r x out) per adapted matrix: their matmuls and weight grads
        d, f, L = c["hidden_size"], c["intermediate_size"], c["num_layers"]
        q, kv = c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]
        shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
        lora = L * sum(RANK * (i + o) for i, o in shapes)
    attn = c["num_layers"] * batch * 6 * seq * seq * c["num_heads"] * c["head_dim"] / 2  # causal half
    return 2 * total * tokens + 2 * total * tokens + 2 * trained * tokens + 6 * lora * tokens + attn


# -- one measurement per process -------------------------------------------------------------------
def build_unijax(c: dict, step: str, batch: int, seq: int, dtype: str = "float32", attention_impl: str = "auto"):
    """-> (the jitted step `(state, frozen, tokens) -> (state, loss)`, state, frozen, tokens)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from unijax.models import lora
    from unijax.models.family import preset
    from unijax.models.janus import Janus
    from unijax.training.params import split_trainable
    from unijax.training.steps import merged_model

    text = dict(c, max_position_embeddings=max(512, seq), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = preset("tiny", text=text, vision={"projection_dim": c["hidden_size"]},
                 vq={"projection_dim": c["hidden_size"], "image_token_embed_dim": c["hidden_size"]},
                 dtype=dtype, param_dtype="float32", attention_impl=attention_impl)
    model = Janus(cfg, rngs=nnx.Rngs(0))
    trainable = {"dense": ("language_model/.*", "lm_head/.*"), "stage1": (FFN_REGEX,), "stage2": ("lm_head/.*",)}[step]
    graphdef, params, frozen = split_trainable(model, trainable, ())
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    if step == "stage2":  # every weight frozen, LoRA on attention + FFN (the head trains to keep a param tree)
        frozen = {**frozen, "lm_head": params.pop("lm_head")}
        adapters, _ = lora.init(frozen, LORA_TARGETS, RANK, jax.random.key(1))
        params = {"lora": jax.tree.map(lambda x: x + 0.0, adapters)}
    tx = optax.adamw(1e-4, weight_decay=0.0)
    state = {"params": params, "opt": tx.init(params)}
    scale = ALPHA / RANK

    def loss_fn(p, frozen, tokens):
        m = merged_model(graphdef, p, frozen, scale)  # LoRA in activation form, as training runs it
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        h, _ = m(tokens, jnp.zeros_like(tokens), pos, jnp.ones_like(tokens))
        logits = m.text_logits(h[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step_fn(state, frozen, tokens):
        loss, g = jax.value_and_grad(loss_fn)(state["params"], frozen, tokens)
        upd, opt = tx.update(g, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], upd), "opt": opt}, loss

    tokens = jnp.asarray(np.random.default_rng(0).integers(3, c["vocab_size"], (batch, seq)), jnp.int32)
    return jax.jit(step_fn, donate_argnums=(0,)), state, frozen, tokens


def run_unijax(c: dict, step: str, batch: int, seq: int, warmup: int, steps: int) -> list[float]:
    train_step, state, frozen, tokens = build_unijax(c, step, batch, seq)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, loss = train_step(state, frozen, tokens)
        loss.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_torch(c: dict, step: str, batch: int, seq: int, warmup: int, steps: int) -> list[float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                      num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
                      num_key_value_heads=c["num_kv_heads"], head_dim=c["head_dim"],
                      max_position_embeddings=max(512, seq), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    if step == "stage1":
        for name, p in model.named_parameters():
            p.requires_grad = ".mlp." in name
    elif step == "stage2":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    tokens = torch.randint(3, c["vocab_size"], (batch, seq))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts)


def one(spec: str, args) -> dict:
    framework, size, step = spec.split(",")
    fn = run_unijax if framework == "unijax" else run_torch
    times = fn(SIZES[size], step, args.batch, args.seq, args.warmup, args.steps)
    return {"framework": framework, "size": size, "step": step, "seconds": statistics.median(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,100m")
    p.add_argument("--step_kinds", default=",".join(STEPS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=str(REPO_ROOT / "bench" / "results" / "train_step.json"))
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)))
        return
    from bench.common import machine_meta, write_json

    rate = matmul_rate()
    tokens = args.batch * args.seq
    runs = []
    for repeat in range(args.repeats):
        for size in args.sizes.split(","):
            for step in args.step_kinds.split(","):
                for framework in ("transformers", "unijax"):
                    cmd = [sys.executable, __file__, "--one", f"{framework},{size},{step}", "--batch", str(args.batch),
                           "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)]
                    out = subprocess.run(cmd, capture_output=True, text=True,
                                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
                    if out.returncode or not line:
                        raise RuntimeError(f"{framework} {size} {step} failed:\n{out.stderr[-3000:]}")
                    r = json.loads(line[0][7:])
                    r["repeat"] = repeat
                    runs.append(r)
                    print(f"[{repeat + 1}/{args.repeats}] {size:5} {step:7} {framework:12} {r['seconds'] * 1e3:9.1f} ms  "
                          f"{tokens / r['seconds']:9.0f} tok/s  {r['peak_rss_mib']:7.0f} MiB", flush=True)
    rows = []
    for size in args.sizes.split(","):
        for step in args.step_kinds.split(","):
            for framework in ("transformers", "unijax"):
                mine = [r for r in runs if (r["framework"], r["size"], r["step"]) == (framework, size, step)]
                seconds = statistics.median(r["seconds"] for r in mine)
                flops = model_flops(SIZES[size], step, tokens, args.seq, args.batch)
                rows.append({"framework": framework, "size": size, "step": step, "seconds": seconds,
                             "seconds_per_repeat": [r["seconds"] for r in mine],
                             "peak_rss_mib": max(r["peak_rss_mib"] for r in mine), "tokens_per_s": tokens / seconds,
                             "model_gflops": flops / 1e9, "matmul_utilisation": flops / seconds / rate})
    print(f"\nfloat32 matmul rate (2048^3 jnp.dot): {rate / 1e9:.0f} GFLOP/s; batch {args.batch} x {args.seq} tokens; "
          f"median of {args.repeats} interleaved repeats\n")
    print("| size | step | transformers tok/s | unijax tok/s | speed-up | unijax % of matmul rate | step / stage-1 step "
          "(transformers, unijax) | peak RSS transformers / unijax (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    get = {(r["framework"], r["size"], r["step"]): r for r in rows}
    for size in args.sizes.split(","):
        for step in args.step_kinds.split(","):
            t, u = get[("transformers", size, step)], get[("unijax", size, step)]
            rel = "-"
            if ("unijax", size, "stage1") in get:
                rel = (f"{t['seconds'] / get[('transformers', size, 'stage1')]['seconds']:.2f}x, "
                       f"{u['seconds'] / get[('unijax', size, 'stage1')]['seconds']:.2f}x")
            print(f"| {size} | {step} | {t['tokens_per_s']:,.0f} | {u['tokens_per_s']:,.0f} | "
                  f"{u['tokens_per_s'] / t['tokens_per_s']:.2f}x | {100 * u['matmul_utilisation']:.0f} % | {rel} | "
                  f"{t['peak_rss_mib']:,.0f} / {u['peak_rss_mib']:,.0f} |")
    write_json(args.json, {"meta": machine_meta(matmul_gflops=rate / 1e9, batch=args.batch, seq=args.seq,
                                                steps=args.steps, repeats=args.repeats), "rows": rows})


if __name__ == "__main__":
    main()
