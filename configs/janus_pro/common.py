"""Janus-Pro recipe on your own data: what every stage of `configs/janus_pro/` shares.

`get_config("1b")` / `get_config("7b")` (the `:1b` / `:7b` of `--config configs/janus_pro/<stage>.py:7b`):
- the converted checkpoint `ckpt/janus_pro_<size>` (`python -m unijax.convert --scan_layers`) and
  its tokenizer (`data.tokenizer=checkpoint`: the copy `unijax.convert` puts in the checkpoint,
  its special ids checked against the checkpoint's config);
- bf16 compute over float32 trainable parameters and bf16 frozen ones (`train.frozen_dtype`),
  scanned and fully rematerialised layers, per-backend kernels (`model.attention_impl=auto`);
- fsdp within a node of 8 devices, data parallel across nodes;
- 1024-token rows (576 image tokens + the conversation), images preprocessed as Janus-Pro's
  processor does, your files as data (`data.mmu_json`, `data.t2i_jsonl`, `data.*_arrayrecord`:
  set them on the command line), a held-out split for the `files_heldout` evaluator;
- no shapes-only phase.
The step counts and learning rates are starting points for post-training a released model (the
AIA paper fine-tunes Janus-Pro-7B on 8 nodes x 8 GPUs with FSDP for about a day); scale
`train.steps` to your data. The guide: docs/finetune_janus_pro.md.
"""

from configs import common

SIZES = {"1b": "janus_pro_1b", "7b": "janus_pro_7b"}
# LoRA on a dense decoder: the attention projections and the FFN (`lora.DEFAULT_TARGETS` less the TA-MoE shared expert)
DENSE_LORA_TARGETS = (r"language_model/layers/(\d+/)?self_attn/(q|k|v|o)_proj/kernel",
                      r"language_model/layers/(\d+/)?mlp/(gate|up|down)_proj/kernel")


def parse(arg) -> tuple[str, bool]:
    """`"7b"`, `"7b+aia"` -> ("7b", aia?)."""
    text = (arg or "1b").lower()
    aia = text.endswith("aia")
    size = text.removesuffix("aia").rstrip("+,") or "1b"
    if size not in SIZES:
        raise ValueError(f"configs/janus_pro: size {size!r} is not one of {sorted(SIZES)} (e.g. :7b or :7b+aia)")
    return size, aia


def recipe(size: str, stage: str):
    c = common.get_config(preset=SIZES[size])
    c.workdir = f"workdir/janus_pro_{size}/{stage}"
    c.init_from = f"ckpt/janus_pro_{size}"
    c.model.preset_from_checkpoint = True  # the converted checkpoint's architecture (the size's preset until it exists)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat_policy = "full"
    c.model.attention_impl = "auto"   # splash on TPU, cuDNN on GPU (bf16), XLA on CPU
    c.train.frozen_dtype = "bfloat16"  # frozen weights in the compute dtype; trainable ones and AdamW stay float32
    # fsdp over 8 devices (a node), data parallel across nodes: on 64 devices 8 x 8, so the
    # per-layer weight all-gathers stay on the node's links (a 64-way fsdp mesh plans about the
    # same memory: docs/multihost.md, activation sharding).
    c.mesh.data = -1
    c.mesh.fsdp = 8
    c.mesh.fit = True                 # fewer devices (one GPU, a CPU): fsdp shrinks to divide them
    c.data.source = "files"
    c.data.tokenizer = "checkpoint"
    c.data.max_len = 1024             # 576 understanding / generation image tokens + the text
    c.data.max_images = 4             # images per conversation; more than one needs a longer data.max_len
    c.data.turns_per_image = 1
    c.data.num_workers = 4
    c.data.overflow = "skip"
    c.data.eval_split = 0.005          # the end of every file is held out for files_heldout
    c.vision_pretrain.steps = 0       # the released SigLIP tower is trained
    c.eval.evaluators = ("files_heldout", "suites")
    c.train.batch_size = 128
    c.train.steps = 4000
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 100
    c.train.min_lr_ratio = 0.1
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.eval_every = 500
    c.train.eval_batches = 16
    c.train.frozen = ("vqmodel/.*", "vision_model/.*")
    return c


def stage1(arg, task: str):
    """Stage 1 on one task ("und" / "gen"): the decoder FFNs train on that task's data alone with
    attention and everything else frozen (UniDecouple's task-specific FFNs)."""
    size, _ = parse(arg)
    c = recipe(size, f"stage1_{task}")
    c.data["gen_ratio" if task == "und" else "und_ratio"] = 0.0
    c.train.trainable = (r"language_model/layers/(.*/)?mlp/.*",)
    c.train.frozen = ()               # everything not trainable is frozen
    # no remat: 7B plans at 23 GiB per device on 64 chips (v5p: 26 % of HBM, v6e: 77 %) and runs a
    # quarter fewer FLOPs than with full remat (docs/benchmarks.md)
    c.model.remat_policy = "none"
    return c


def dpo(arg, task: str):
    """DPO on one task's preference pairs ("und" / "gen"; align-anything trains them in separate runs)
    from the converted checkpoint. `arg`: `1b` / `7b`, `+full` for full fine-tuning of the decoder
    against a frozen copy (default: LoRA rank 16 on the decoder, the reference = adapters off)."""
    text = (arg or "1b").lower()
    full = text.endswith("full")
    size, _ = parse(text.removesuffix("full").rstrip("+,") or "1b")
    c = recipe(size, f"dpo_{task}" + ("_full" if full else ""))
    c.train.objective = "dpo"
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"
    c.data["gen_ratio" if task == "und" else "und_ratio"] = 0.0
    c.data.eval_split = 0.005         # held-out pairs: the end of every file (preference_heldout)
    c.eval.evaluators = ("preference_heldout", "suites")
    c.train.batch_size = 64           # pairs: 128 rows a step
    c.train.steps = 2000
    c.train.learning_rate = 5e-6 if full else 5e-5
    if full:
        c.train.trainable = (r"language_model/.*",)
        c.train.frozen = ()
    else:
        c.model.lora.rank = 16
        c.model.lora.alpha = 32.0
        c.model.lora.targets = DENSE_LORA_TARGETS
        c.train.trainable = ()        # the adapters alone: the reference is the adapters-off model
        c.train.frozen = ()
    return c
