"""The training config: every key with its default (`defaults`), one validation pass (`validate`),
and the model config a training config stands for (`model_config`).

Every key a stage or a command line may set exists in `defaults` with its type, so a misspelt
`--config.train.stpes=10` or `--config.train.steps=ten` fails at parse time naming the key.
Architecture keys (`model.text.*`, `model.vision.*`, `model.vq.*`, `model.image_token_id`, ...) are
typed placeholders: unset (None) means "the value of `model.preset`". `configs/common.py` is this
module's `defaults` as a config file; the stage configs in `configs/` build on it.

`validate(config)` is the one check every entry point runs before anything compiles (`train`,
`plan`, vision pre-training): a typo or an impossible size stops the run naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict

from unijax import checkpoints
from unijax.data.pipeline import OVERFLOW_POLICIES
from unijax.data.tokenizer import DEFAULT_DATA_DIR, DEFAULT_TOKENIZER
from unijax.models import config as model_cfg
from unijax.models import family as families
from unijax.models import lora
from unijax.models.config import MOE_RUNTIME_KEYS, RUNTIME_KEYS, JanusConfig, family_of
from unijax.training import aia, evaluators, objectives, vision_pretrain

DATA_SOURCES = ("shapes", "files")  # data.source
FROZEN_DTYPES = ("", "float32", "bfloat16", "float16")  # train.frozen_dtype
# init_recipe (unijax.analysis.recipe)
INIT_RECIPES = ("", "stage0_lm", "stage0_vq", "base", "stage1_und", "stage1_gen", "upcycled", "stage2")
ARCH_KEYS = ("text", "vision", "vq", "image_token_id", "boi_token_id", "eoi_token_id")


def _placeholders(cls) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        t = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(
            str(f.type), tuple)
        d[f.name] = config_dict.placeholder(t)
    return d


def model(preset: str = "tiny") -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.family = "janus"         # janus | emu3 | a registered family (unijax.models.family); model.preset names one of its presets
    m.preset = preset
    m.preset_from_checkpoint = False  # True: init_from's own architecture when it exists (model.preset until then)
    m.ffn = "dense"            # dense | ta_moe (the TA-MoE FFN, configured by the top-level moe.* keys)
    m.lora = ml_collections.ConfigDict()   # LoRA on frozen weights (unijax/models/lora.py)
    m.lora.rank = 0                        # 0 = off; the paper's stage 2: 16
    m.lora.alpha = 32.0                    # W + (alpha / rank) * A @ B
    m.lora.dropout = 0.0
    m.lora.targets = lora.DEFAULT_TARGETS  # regexes over frozen parameter paths (attention, FFN, experts)
    m.text = _placeholders(model_cfg.TextConfig)
    m.vision = _placeholders(model_cfg.VisionConfig)
    m.vq = _placeholders(model_cfg.VQConfig)
    for key in ("image_token_id", "boi_token_id", "eoi_token_id"):
        m[key] = config_dict.placeholder(int)
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.scan_layers = False
    m.remat_policy = "none"      # REMAT_POLICIES (unijax.models.config)
    m.attention_impl = "auto"    # ATTENTION_IMPLS
    return m


def defaults(preset: str = "tiny") -> ml_collections.ConfigDict:
    """Every training config key with its default value and type (the stage configs start here)."""
    c = ml_collections.ConfigDict()
    c.workdir = "workdir/base"
    c.init_from = ""             # a unijax model checkpoint (convert output or <workdir>/model)
    # with init_from empty, `python -m unijax.train` first builds this recipe model (and what it needs) under
    # <workdir>/prerequisites and starts from it: stage0_lm | stage0_vq | base | stage1_und | stage1_gen | upcycled
    # (unijax.analysis.recipe.RECIPE); "" = none (a fresh model)
    c.init_recipe = ""
    c.seed = 0
    c.model = model(preset)

    # device mesh: one axis may be -1 (the rest); fit=True shrinks each fixed size to divide the devices
    # present (gcd, in data, fsdp, expert, tensor order) and gives the rest to the -1 axis (or data)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, fit=False))

    # TA-MoE FFN (read when model.ffn = "ta_moe"; unijax/models/moe.py)
    moe = c.moe = ml_collections.ConfigDict()
    moe.num_experts_per_group = 4      # SwiGLU experts in the MMU group, and as many in the T2I group
    moe.num_shared_experts = 1
    moe.top_k = 2                      # experts per token inside its group (2:1 with one shared expert)
    moe.expert_intermediate_size = 0   # 0 = model.text.intermediate_size (what upcycling copies)
    moe.group_assignment = "label"     # label (the batch's task) | router (task-router argmax) | soft
    moe.impl = "auto"                  # auto | capacity | dropless (auto: capacity on CPU/GPU, dropless on TPU)
    moe.capacity_factor = 1.25
    moe.alpha_init = 1.0               # y = h_experts + alpha * shared(x), alpha learnable per layer
    moe.layers = config_dict.placeholder(tuple)  # decoder layers made TA-MoE; unset = every layer

    # Vision pre-training (unijax/training/vision_pretrain.py): before step 1 of a fresh run, train the
    # SigLIP tower alone to tag the shapes identities in each image (the stand-in for a pretrained SigLIP)
    v = c.vision_pretrain = ml_collections.ConfigDict()
    v.steps = 0                  # 0 = off
    v.batch_size = 64
    v.learning_rate = 6e-3       # peak; warmup + cosine decay and the other AdamW settings come from train.*
    v.warmup_steps = 50
    v.log_every = 100
    v.eval_images = 512          # held-out images for the exact-identity-set score
    v.with_init_from = False     # also when init_from is set (its tower untrained: a stage-0 model); else skipped
    v.dense_weight = 1.0         # weight of the per-patch identity loss (each patch: its object's identity or none)

    # Adaptor warm-up (Janus-Pro's stage I; unijax.training.loop.warm_up_adaptors): when a run pre-trains its
    # vision tower, it then trains `steps` steps with the decoder frozen (the aligners, the generation embeddings
    # and head learn to speak to it) in <workdir>/adaptor_warmup, and the run starts from that model
    w = c.adaptor_warmup = ml_collections.ConfigDict()
    w.steps = 0                  # 0 = off
    w.frozen = ("language_model/.*", "lm_head/.*")  # frozen during the warm-up, on top of train.frozen

    d = c.data = ml_collections.ConfigDict()
    d.source = "shapes"          # shapes | files (DATA_SOURCES)
    d.dir = DEFAULT_DATA_DIR     # cache of built artefacts (the shapes tokenizer)
    d.tokenizer = DEFAULT_TOKENIZER  # shapes | path to a transformers tokenizer directory
    d.max_len = 112              # shapes samples are at most 99 tokens (64 image slots + text)
    d.packing = False
    d.gen_ratio = 1.0            # Gen:Und mixing ratio of the two task datasets
    d.und_ratio = 1.0
    d.cfg_drop_prob = 0.1        # T2I prompts blanked for classifier-free guidance
    d.question_kinds = ""        # comma-separated shapes question kinds; empty = all
    d.question_weights = ""      # shapes training mix: "exist=3,choice=2" (shapes.FAMILIES; others 1) and the
                                 # existence negatives' mix: "exist_adversarial=3" (shapes.EXIST_NEGATIVE_KINDS)
    d.turns_per_image = 1        # shapes MMU samples: questions (chat turns) about each image
    d.scene_text = False         # shapes MMU samples describe the scene in words, no image (configs/stage0_lm.py)
    d.num_workers = 0            # grain worker processes (0 = in the training process)
    d.prefetch = 2               # batches a background thread prepares ahead (when num_workers = 0)
    d.read_threads = 4           # threads decoding samples per process (grain's ReadOptions.num_threads)
    d.read_ahead = 4             # elements (batches; samples when packing) decoded ahead per process
    d.skip_bad_records = True    # a bad record (missing image, bad JSON, ...) is skipped and counted; False: stop
    d.max_image_pixels = 40_000_000  # an image file above this (read from its header, before decoding) is a bad record
    d.max_image_bytes = 64 << 20     # so is an image file larger than this, or one that is not a regular file
    d.allow_outside_image_root = False  # an image path leaving the image root (`../`, absolute) is a bad record
    d.max_images = 1             # understanding images per conversation (multi-image records; more: overflow)
    d.overflow = "skip"          # a sample longer than max_len: skip (counted) | truncate (last turns) | error
    d.mmu_json = ""              # comma-separated LLaVA-style conversation files, .json or .jsonl (source=files)
    d.mmu_image_root = ""        # their images' folder (empty: each file's own folder)
    d.mmu_weights = ""           # comma-separated mixture weight per mmu_json file; empty: by size
    d.t2i_jsonl = ""             # comma-separated caption files, .jsonl ({"image", "caption"}) or .parquet
    d.t2i_image_root = ""
    d.t2i_weights = ""           # mixture weight per t2i_jsonl file; empty: by size
    d.eval_split = 0.0           # held out from the end of every file for `files_heldout` (e.g. 0.01); 0: none
    d.eval_mmu_json = ""         # or held-out files (same formats and image roots); then nothing is split off
    d.eval_t2i_jsonl = ""
    d.mmu_arrayrecord = ""       # comma-separated ArrayRecord files (unijax.data.sources)
    d.t2i_arrayrecord = ""
    d.pref_jsonl = ""            # train.objective=dpo: comma-separated preference-pair files (unijax.data.preference)
    d.pref_image_root = ""       # their images' folder
    d.eval_pref_jsonl = ""       # held-out pairs (else the data.eval_split end of each file)
    d.pref_arrayrecord = ""      # or pairs packed by `python -m unijax.pack --pref` (comma-separated, globs)

    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000
    t.objective = "lm"     # lm (next-token, both tasks) | vq (stage 0: the VQ tokenizer) | dpo (preference pairs)
    t.batch_size = 32            # global batch per update (every process's rows together)
    t.grad_accum_steps = 1       # the update's batch runs as this many micro-batches (activations of one)
    t.learning_rate = 1e-3
    t.warmup_steps = 100
    t.min_lr_ratio = 0.1
    t.weight_decay = 0.05
    t.grad_clip = 1.0
    t.b1 = 0.9
    t.b2 = 0.95
    t.eps = 1e-8
    t.lr_scales = ()             # ("regex=factor", ...): per-group learning-rate multipliers over param paths
    t.trainable = (".*",)
    t.frozen = ("vqmodel/.*",)
    t.frozen_dtype = ""          # dtype the frozen parameters are held in ("bfloat16"); "" = model.param_dtype.
                                 # Trainable parameters, LoRA adapters and optimizer state keep model.param_dtype
    t.checkpoint_every = 200
    t.keep_checkpoints = 2
    t.async_checkpointing = True
    t.log_every = 10
    t.peak_tflops = 0.0          # per device, for the logged MFU; 0 = the device kind's dense bf16 peak
    t.eval_every = 200
    t.eval_batches = 8
    t.eval_at_start = False      # evaluate before step 1 too; the run ends with a "start -> end" line of the scores

    # Evaluators (unijax/training/evaluators.py) the loop runs on their cadence; each declines when it
    # does not apply (shapes_heldout: data.source != shapes; suites: no eval_suites.names)
    c.eval = ml_collections.ConfigDict()
    c.eval.evaluators = ("shapes_heldout", "files_heldout", "suites")

    # Benchmark suites (unijax/inference/suites.py) run on the current model during training, logged as
    # suite/<name>/<metric>; the same suites as `python -m unijax.evaluate`, on smaller held-out sets
    e = c.eval_suites = ml_collections.ConfigDict()
    e.names = ()                 # e.g. ("shapes_pope", "shapes_mc", "shapes_geneval"); () = off
    e.every = 0                  # steps between runs; 0 = train.eval_every
    e.num_images = 25            # shapes_pope images (up to 4 questions each)
    e.num_questions = 50         # shapes_mc questions
    e.per_tag = 2                # shapes_geneval prompts per tag
    e.samples = 1                # generation suites: images per prompt
    e.cfg = 5.0                  # generation suites: classifier-free guidance
    e.batch_size = 16            # rows decoded together
    e.files = ""                 # pope / mmmu / geneval: comma-separated benchmark files
    e.image_root = ""

    loss = c.loss = ml_collections.ConfigDict()
    loss.text_weight = 1.0       # lambda for understanding (text CE on answer tokens)
    loss.image_weight = 1.0      # lambda for generation (image-code CE)
    loss.group_weight = 0.1      # gamma: task-router cross-entropy L_group (TA-MoE)
    loss.balance_weight = 0.01   # beta: Switch load balance inside each expert group (TA-MoE)
    loss.z_weight = 0.001        # zeta: router z-loss (TA-MoE)
    loss.aia_weight = 0.0        # lambda of the AIA loss for both tasks (0 = off; the paper: 40)
    loss.aia_gen_weight = config_dict.placeholder(float)  # per-task lambda; unset = aia_weight
    loss.aia_und_weight = config_dict.placeholder(float)  # (the official code: 5 for T2I, 10 for MMU)
    loss.chunk_size = 512        # columns per chunk of the heads' CE, at loss positions only (no f32 [B, T, V]); 0 = whole
    loss.vq_beta = 0.25          # stage 0: commitment weight
    loss.vq_entropy_weight = 0.0

    # train.objective=dpo (unijax/training/objectives/dpo.py)
    p = c.dpo = ml_collections.ConfigDict()
    p.beta = 0.1                 # strength of the pull towards the reference model
    p.loss_type = "sigmoid"      # sigmoid (DPO) | ipo
    p.label_smoothing = 0.0      # sigmoid only: the assumed share of flipped preferences (cDPO)
    p.sft_weight = 0.0           # + this x the chosen responses' cross-entropy (TRL's rpo_alpha)
    p.guidance = 1.0             # != 1: image codes scored under the CFG-guided distribution decoding samples

    # AIA (unijax/training/aia.py): cross-modal attention intensity targets and spans
    a = c.aia = ml_collections.ConfigDict()
    a.gen_targets = "janus_pro"  # janus_pro | emu3 | official (layer-range tables) | a curve file
    a.und_targets = "janus_pro"  # (python -m unijax.analyze intensity --out curve.json)
    a.curve_delta = 0.05         # Huber threshold for curve-file targets without their own "delta"
    a.include_bos = True         # T2I keys: BOS counts as prompt (the official code)
    a.und_queries = "answer"     # MMU queries: answer | after_image (all text after the image)
    a.skip_cfg_blank = True      # no AIA loss on prompts blanked for classifier-free guidance
    a.impl = "lean"              # lean (an indicator channel in V) | explicit (sum of probabilities): AIA_IMPLS
    return c


CHECKPOINT_PRESET = "checkpoint"  # model.preset: the architecture of the init_from checkpoint


def model_config(config) -> JanusConfig:
    """`model.preset` of `model.family` with every set (non-None) `model.*` architecture key and the
    runtime keys on top (the family refuses keys it has not: an Emu3 model has no `model.vision.*`,
    `Family.check_model_keys`). `model.preset=checkpoint` starts from the `init_from`
    checkpoint's own config instead (a converted model of any size: nothing to restate); so does
    `model.preset_from_checkpoint=True` once that checkpoint exists (`plan` of a recipe before the
    conversion uses `model.preset`)."""
    m = config.model
    family = m.get("family", "janus")
    overrides: dict[str, Any] = {}
    for key in ARCH_KEYS:
        value = m[key]
        if isinstance(value, ml_collections.ConfigDict):
            value = {k: v for k, v in value.to_dict().items() if v is not None}
            if value:
                families.get(family).check_model_keys(key, value)
                overrides[key] = value
        elif value is not None:
            overrides[key] = value
    overrides.update({k: m[k] for k in RUNTIME_KEYS})
    overrides["ffn"] = m.ffn
    from_checkpoint = m.preset == CHECKPOINT_PRESET or (
        m.get("preset_from_checkpoint", False) and config.init_from
        and (pathlib.Path(config.init_from) / "model.json").is_file())
    if from_checkpoint:
        if not config.init_from:
            raise ValueError("model.preset=checkpoint takes the architecture of init_from, but init_from is empty")
        saved = checkpoints.read_config(config.init_from)
        if family_of(saved) != family:
            raise ValueError(f"model.family={family} but init_from={config.init_from} holds a "
                             f"{family_of(saved)} model")
        if m.ffn == "ta_moe" and saved.ffn == "ta_moe":  # its experts as upcycled; only runtime moe keys apply
            moe = config.moe.to_dict()
            overrides["moe"] = {k: moe[k] for k in MOE_RUNTIME_KEYS}
        elif m.ffn == "ta_moe":
            raise ValueError(f"model.ffn=ta_moe but init_from={config.init_from} is dense: upcycle it first "
                             f"(python -m unijax.upcycle)")
        saved_dict = {k: v for k, v in saved.to_dict().items() if k != "family"}
        return families.with_overrides(saved_dict, family, **overrides)
    if m.ffn == "ta_moe":
        moe = config.moe.to_dict()
        moe["layers"] = tuple(moe["layers"] or ())
        overrides["moe"] = moe
    return families.preset(m.preset, family, **overrides)


# the special token ids a model config holds: (sub-config or None, attribute)
SPECIAL_ID_KEYS = (("text", "pad_token_id"), ("text", "bos_token_id"), ("text", "eos_token_id"),
                   (None, "image_token_id"), (None, "boi_token_id"), (None, "eoi_token_id"))


def with_checkpoint_ids(config, cfg, saved):
    """`cfg` with the special token ids of the `init_from` checkpoint's config `saved` (a converted
    checkpoint's are the release's own: Janus-Pro-1B pads with 100002, -7B with 100015), never a
    preset's defaults. An id set explicitly under `model.*` that differs is an error naming both."""
    text, top = {}, {}
    for sub, name in SPECIAL_ID_KEYS:
        want = getattr(saved.text if sub else saved, name)
        explicit = config.model.text[name] if sub else config.model.get(name)
        if explicit is not None and explicit != want:
            key = f"model.{sub + '.' if sub else ''}{name}"
            raise ValueError(f"{key}={explicit} but the init_from checkpoint {config.init_from} has {want}; "
                             f"drop {key} (ids come from the checkpoint) or convert the matching checkpoint")
        (text if sub else top)[name] = want
    return cfg.replace(text=dataclasses.replace(cfg.text, **text), **top)


def validate(config) -> None:
    """The one check of a training config, run by `train`, `plan` and vision pre-training before
    anything compiles: everything a typo or an impossible size would break later, named by its key.
    (Mesh-dependent sizes: `unijax.sharding.check_batch`, once the mesh exists.)"""
    t = config.train
    for key in ("steps", "batch_size", "grad_accum_steps", "checkpoint_every", "log_every", "eval_every",
                "keep_checkpoints"):
        if int(t[key]) <= 0:
            raise ValueError(f"train.{key}={t[key]} must be positive")
    if t.batch_size % t.grad_accum_steps:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps="
                         f"{t.grad_accum_steps} (each update runs batch_size / grad_accum_steps rows at a time)")
    if t.get("frozen_dtype", "") not in FROZEN_DTYPES:
        raise ValueError(f"train.frozen_dtype={t.frozen_dtype!r}: expected one of {FROZEN_DTYPES} ('' = model.param_dtype)")
    lr = float(t.learning_rate)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"train.learning_rate={t.learning_rate} must be a positive number")
    for key in ("max_image_pixels", "max_image_bytes"):
        if int(config.data[key]) <= 0:
            raise ValueError(f"data.{key}={config.data[key]} must be positive")
    if float(t.peak_tflops) < 0:
        raise ValueError(f"train.peak_tflops={t.peak_tflops} must be >= 0 (0: the device kind's known peak)")
    if not 0 <= config.data.cfg_drop_prob < 1:
        raise ValueError(f"data.cfg_drop_prob={config.data.cfg_drop_prob} must be in [0, 1)")
    if not 0 <= config.data.eval_split < 1:
        raise ValueError(f"data.eval_split={config.data.eval_split} must be in [0, 1)")
    if config.data.overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"data.overflow={config.data.overflow!r}: expected one of {OVERFLOW_POLICIES}")
    if config.init_recipe not in INIT_RECIPES:
        raise ValueError(f"init_recipe={config.init_recipe!r}: expected one of {INIT_RECIPES}")
    if config.data.source not in DATA_SOURCES:
        raise ValueError(f"data.source={config.data.source!r}: expected one of {DATA_SOURCES}")
    if config.data.get("scene_text", False) and config.data.source != "shapes":
        raise ValueError(f"data.scene_text=True describes shapes scenes in words; data.source="
                         f"{config.data.source!r} has no scenes to describe (set data.scene_text=False)")
    objectives.get(config).check(config)
    families.get(config.model.family)
    lo = config.model.lora
    if lo.rank < 0 or (lo.rank and not (lo.alpha > 0 and 0 <= lo.dropout < 1)):
        raise ValueError(f"model.lora: rank={lo.rank} (>= 0), alpha={lo.alpha} (> 0) and dropout={lo.dropout} "
                         f"(in [0, 1)) are out of range")
    if config.data.read_threads < 0 or config.data.read_ahead < 1:
        raise ValueError(f"data.read_threads={config.data.read_threads} (>= 0) and data.read_ahead="
                         f"{config.data.read_ahead} (>= 1) are out of range")
    if config.data.num_workers < 0:
        raise ValueError(f"data.num_workers={config.data.num_workers} must be >= 0")
    cfg = model_config(config)
    # AIA: target tables / curve files and spans; the explicit path needs the explicit attention
    # (`auto` resolves to that path under explicit AIA; a kernel named explicitly is an error)
    if aia.settings(config, cfg.text.num_layers) and config.aia.impl == "explicit" and cfg.attention_impl not in ("xla", "auto"):
        raise ValueError(f"aia.impl='explicit' needs model.attention_impl='xla' or 'auto' (got {cfg.attention_impl!r}); "
                         f"use aia.impl='lean'")
    vision_pretrain.validate(config)
    if config.adaptor_warmup.steps < 0:
        raise ValueError(f"adaptor_warmup.steps={config.adaptor_warmup.steps} must be >= 0 (0 = off)")
    if config.adaptor_warmup.steps and set(config.train.trainable) <= set(config.adaptor_warmup.frozen):
        raise ValueError(f"adaptor_warmup.steps={config.adaptor_warmup.steps}: train.trainable="
                         f"{list(config.train.trainable)} trains only what adaptor_warmup.frozen freezes, so the "
                         f"warm-up has nothing to train; set adaptor_warmup.steps=0")
    evaluators.validate(config)
