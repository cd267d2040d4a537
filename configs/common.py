"""The training config every stage starts from (`configs/base.py`, `configs/stage0_vq.py`, ...).

Every key a stage or a command line may set exists here with its type, so a misspelt
`--config.train.stpes=10` or `--config.train.steps=ten` fails at parse time naming the key.
Architecture keys (`model.text.*`, `model.vision.*`, `model.vq.*`, `model.image_token_id`, ...) are
typed placeholders: unset (None) means "the value of `model.preset`".
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from unijax.models import config as model_config
from unijax.models import lora


def _placeholders(cls) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        t = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(
            str(f.type), tuple)
        d[f.name] = config_dict.placeholder(t)
    return d


def model(preset: str = "tiny") -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.family = "janus"         # janus | emu3 (unijax.models.family; model.preset names one of its presets)
    m.preset = preset
    m.ffn = "dense"            # dense | ta_moe (the TA-MoE FFN, configured by the top-level moe.* keys)
    m.lora = ml_collections.ConfigDict()   # LoRA on frozen weights (unijax/models/lora.py)
    m.lora.rank = 0                        # 0 = off; the paper's stage 2: 16
    m.lora.alpha = 32.0                    # W + (alpha / rank) * A @ B
    m.lora.dropout = 0.0
    m.lora.targets = lora.DEFAULT_TARGETS  # regexes over frozen parameter paths (attention, FFN, experts)
    m.text = _placeholders(model_config.TextConfig)
    m.vision = _placeholders(model_config.VisionConfig)
    m.vq = _placeholders(model_config.VQConfig)
    for key in ("image_token_id", "boi_token_id", "eoi_token_id"):
        m[key] = config_dict.placeholder(int)
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.scan_layers = False
    m.remat_policy = "none"
    m.attention_impl = "xla"
    return m


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "workdir/base"
    c.init_from = ""             # a unijax model checkpoint (convert output or <workdir>/model)
    c.seed = 0
    c.objective = "lm"           # lm (next-token, both tasks) | vq (stage 0: the VQ tokenizer)
    c.model = model(preset)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))

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

    d = c.data = ml_collections.ConfigDict()
    d.source = "shapes"          # shapes | files
    d.dir = "data"               # cache of built artefacts (the shapes tokenizer)
    d.tokenizer = "shapes"       # shapes | path to a transformers tokenizer directory
    d.max_len = 112              # shapes samples are at most 99 tokens (64 image slots + text)
    d.packing = False
    d.gen_ratio = 1.0            # Gen:Und mixing ratio of the two task datasets
    d.und_ratio = 1.0
    d.cfg_drop_prob = 0.1        # T2I prompts blanked for classifier-free guidance
    d.question_kinds = ""        # comma-separated shapes question kinds; empty = all
    d.turns_per_image = 1        # shapes MMU samples: questions (chat turns) about each image
    d.num_workers = 0            # grain worker processes (0 = in the training process)
    d.prefetch = 2               # batches a background thread prepares ahead (when num_workers = 0)
    d.skip_bad_records = False
    d.mmu_json = ""              # LLaVA-style conversations (data.source=files)
    d.mmu_image_root = ""
    d.t2i_jsonl = ""             # {"image": ..., "caption": ...} per line
    d.t2i_image_root = ""
    d.mmu_arrayrecord = ""       # comma-separated ArrayRecord files (unijax.data.sources)
    d.t2i_arrayrecord = ""

    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000
    t.batch_size = 32
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
    t.checkpoint_every = 200
    t.keep_checkpoints = 2
    t.async_checkpointing = True
    t.log_every = 10
    t.eval_every = 200
    t.eval_batches = 8

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
    loss.vq_beta = 0.25          # stage 0: commitment weight
    loss.vq_entropy_weight = 0.0

    # AIA (unijax/training/aia.py): cross-modal attention intensity targets and spans
    a = c.aia = ml_collections.ConfigDict()
    a.gen_targets = "janus_pro"  # janus_pro | emu3 | official (layer-range tables) | a curve file
    a.und_targets = "janus_pro"  # (python -m unijax.analyze intensity --out curve.json)
    a.curve_delta = 0.05         # Huber threshold for curve-file targets without their own "delta"
    a.include_bos = True         # T2I keys: BOS counts as prompt (the official code)
    a.und_queries = "answer"     # MMU queries: answer | after_image (all text after the image)
    a.skip_cfg_blank = True      # no AIA loss on prompts blanked for classifier-free guidance
    a.impl = "lean"              # lean (an indicator channel in V) | explicit (sum of probabilities)
    return c
