"""`train.objective=dpo`: direct preference optimisation on pairs of both tasks (`unijax.data.preference`).

A batch row is a pair: every per-token array is `[B, 2, T]`, chosen then rejected, so gradient
accumulation and the batch sharding split pairs, never their sides. For a pair with chosen `c` and
rejected `r` sides, `log pi(y | x)` is the sum of the policy's log-probabilities of the side's
response tokens (an understanding answer's text tokens, a generated image's codes) and `log ref`
the same under the frozen reference (the starting model: the LoRA adapters off, or a frozen copy):

    z     = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    sigmoid (Rafailov et al. 2023):  L = -(1 - eps) log sigma(beta z) - eps log sigma(-beta z)
    ipo     (Azar et al. 2023):      L = (z_avg - 1 / (2 beta))^2, z_avg on per-token mean log-probs

both as TRL's `DPOTrainer` computes them (`loss_type`, `label_smoothing` = eps), averaged over the
batch's pairs; `dpo.sft_weight` adds the chosen responses' token-mean cross-entropy (TRL's
`rpo_alpha`). Rewards are `beta (log pi - log ref)` of each side (IPO: of the per-token means);
the metrics are their means over pairs, the margin and the preference accuracy (chosen reward >
rejected reward), on training and held-out pairs (`preference_heldout`). A TA-MoE model adds its
router losses with the `loss.*` weights, as under `lm`.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np

from unijax import sharding
from unijax.contract import BATCH_KEYS, T2I, TEXT
from unijax.data import arrayrecord, datasets, preference, records
from unijax.data import pipeline as pipe
from unijax.distributed import to_host
from unijax.inference.decode import guided_logits
from unijax.models import family
from unijax.models.forward import IMAGE_LOGITS, TEXT_LOGITS, lm_hidden
from unijax.training import evaluators, losses
from unijax.training.objectives import Objective, get, register
from unijax.training.steps import merged_model, reference_model

Array = jax.Array
LOSS_TYPES = ("sigmoid", "ipo")  # dpo.loss_type


def response_logps(text_ce: Array, image_ce: Array, rows: dict[str, Array]) -> tuple[Array, Array]:
    """Per-position cross-entropies of both heads `[N, T]` -> (summed log-probability of each row's
    response tokens `[N]`, its response tokens `[N]`)."""
    tw, iw = rows["text_weights"], rows["image_weights"]
    return -jnp.sum(text_ce * tw + image_ce * iw, axis=1), jnp.sum(tw + iw, axis=1)


def null_rows(rows: dict[str, Array], cfg) -> dict[str, Array]:
    """`rows` with every generation prompt replaced by the family's CFG null prompt
    (`family.null_prompt`; image slots, understanding rows and the attention layout are unchanged):
    the unconditional branch of classifier-free guidance."""
    tokens = rows["tokens"]
    prompt = (rows["task"] == T2I) & (rows["modality"] == TEXT)
    return {**rows, "tokens": jnp.where(prompt, family.null_prompt(tokens, cfg), tokens)}


def sequence_logps(model, rows: dict[str, Array], images_per_row: tuple[int, int], chunk_size: int = 512,
                   guidance: float = 1.0):
    """-> (summed log-probability of each row's response tokens `[N]`, response tokens `[N]`, aux) for
    rows of the batch contract; `chunk_size` > 0: the heads a chunk of positions at a time
    (`losses.chunked_logit_stats`), 0: from the whole logits. `guidance` != 1: image codes are scored
    under the classifier-free guided distribution `guided_logits(cond, null, guidance)` that decoding samples
    from (a second forward pass on `null_rows`); text tokens under the conditional one."""
    k = model.cfg.vq.num_embeddings
    h, targets, aux = lm_hidden(model, rows, images_per_row)
    codes = jnp.clip(targets, 0, k - 1)
    if guidance != 1.0:
        hu, _, _ = lm_hidden(model, null_rows(rows, model.cfg), images_per_row)
        e = h.shape[-1]
        head = lambda hh: guided_logits(model.image_logits(hh[..., :e]), model.image_logits(hh[..., e:]), guidance)  # noqa: E731
        h_image = jnp.concatenate([h, hu.astype(h.dtype)], axis=-1)
    else:
        head, h_image = model.image_logits, h
    if chunk_size:
        text_ce = losses.chunked_logit_stats(h, model.text_logits, targets, chunk_size, TEXT_LOGITS)
        image_ce = losses.chunked_logit_stats(h_image, head, codes, chunk_size, IMAGE_LOGITS)
    else:
        text_ce = losses.cross_entropy(sharding.constrain(model.text_logits(h), TEXT_LOGITS), targets)
        image_ce = losses.cross_entropy(sharding.constrain(head(h_image), IMAGE_LOGITS), codes)
    return (*response_logps(text_ce, image_ce, rows), aux)


def preference_loss(pc: Array, pr: Array, rc: Array, rr: Array, nc: Array, nr: Array, *, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
    """Per-pair (loss, chosen reward, rejected reward) from summed log-probs of the policy (`pc`, `pr`)
    and the reference (`rc`, `rr`) over `nc` / `nr` response tokens (module docstring)."""
    if loss_type == "ipo":  # per-token means
        pc, rc = pc / jnp.maximum(nc, 1.0), rc / jnp.maximum(nc, 1.0)
        pr, rr = pr / jnp.maximum(nr, 1.0), rr / jnp.maximum(nr, 1.0)
    z = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        loss = -jax.nn.log_sigmoid(beta * z) * (1 - label_smoothing) - jax.nn.log_sigmoid(-beta * z) * label_smoothing
    elif loss_type == "ipo":
        loss = (z - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    return loss, jax.lax.stop_gradient(beta * (pc - rc)), jax.lax.stop_gradient(beta * (pr - rr))


def pair_rows(batch: dict[str, Array]) -> dict[str, Array]:
    """`[B, 2, T, ...]` pair arrays -> `[2B, T, ...]` rows (pair i's chosen side at 2i, rejected at 2i + 1)."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items() if k in BATCH_KEYS}


def valid_pairs(batch: dict[str, Array]) -> Array:
    """`[B]`: pairs both of whose sides have response tokens (a skipped record has none)."""
    n = jnp.sum(batch["text_weights"] + batch["image_weights"], axis=-1)  # [B, 2]
    return jnp.all(n > 0, axis=-1)


@dataclasses.dataclass(frozen=True)
class Settings:
    beta: float
    loss_type: str
    label_smoothing: float
    sft_weight: float
    chunk_size: int
    guidance: float
    images_per_row: tuple[int, int]
    group_weight: float = 0.0
    balance_weight: float = 0.0
    z_weight: float = 0.0


def pair_stats(model, reference, batch: dict[str, Array], s: Settings):
    """-> (per-pair loss, chosen reward, rejected reward, chosen log-probs, chosen tokens, aux) of a
    batch of pairs."""
    rows = pair_rows(batch)
    logp, n, aux = sequence_logps(model, rows, s.images_per_row, s.chunk_size, s.guidance)
    ref, _, _ = sequence_logps(reference, rows, s.images_per_row, s.chunk_size, s.guidance)
    ref = jax.lax.stop_gradient(ref)
    pc, pr, rc, rr, nc, nr = logp[0::2], logp[1::2], ref[0::2], ref[1::2], n[0::2], n[1::2]
    loss, cr, rr_ = preference_loss(pc, pr, rc, rr, nc, nr, beta=s.beta, loss_type=s.loss_type,
                                    label_smoothing=s.label_smoothing)
    return loss, cr, rr_, pc, nc, aux, rows


def dpo_loss(model, batch: dict[str, Array], *, settings: Settings, whole: dict[str, Array] | None = None,
             reference=None):
    """(loss, metrics) of a batch of pairs (module docstring). `whole`: the update's batch when
    `batch` is one micro-batch of it: the means divide by the whole batch's pairs and tokens."""
    s = settings
    loss_pair, cr, rr, pc, nc, aux, rows = pair_stats(model, reference, batch, s)
    valid = valid_pairs(batch).astype(jnp.float32)
    pairs = jnp.sum(valid)
    total = pairs if whole is None else jnp.sum(valid_pairs(whole).astype(jnp.float32))
    chosen_tokens = jnp.sum(nc * valid)
    total_chosen = chosen_tokens if whole is None else jnp.sum(
        jnp.sum(whole["text_weights"][:, 0] + whole["image_weights"][:, 0], -1) * valid_pairs(whole))
    loss_dpo = jnp.sum(loss_pair * valid) / jnp.maximum(total, 1.0)
    loss_sft = jnp.sum(-pc * valid) / jnp.maximum(total_chosen, 1.0)
    loss = loss_dpo + s.sft_weight * loss_sft
    mean = lambda x: jnp.sum(x * valid) / jnp.maximum(pairs, 1.0)  # noqa: E731
    metrics = {"loss_dpo": loss_dpo, "loss_sft": loss_sft, "reward_chosen": mean(cr), "reward_rejected": mean(rr),
               "reward_margin": mean(cr - rr), "reward_accuracy": mean((cr > rr).astype(jnp.float32)),
               "pairs": pairs, "tokens": jnp.sum(rows["segment_ids"] > 0).astype(jnp.float32)}
    if "task_logits" in aux:
        m = losses.moe_losses(aux, rows, top_k=model.cfg.moe.top_k,
                              total=None if whole is None else jnp.sum(whole["segment_ids"] > 0).astype(jnp.float32))
        loss = loss + s.group_weight * m["loss_group"] + s.balance_weight * m["loss_balance"] + s.z_weight * m["loss_z"]
        metrics.update(m)
    metrics["loss"] = loss
    return loss, metrics


def dpo_eval(model, batch: dict[str, Array], *, settings: Settings, reference):
    """Per-pair held-out results: rewards of both sides and whether the pair counts."""
    _, cr, rr, _, _, _, _ = pair_stats(model, reference, batch, settings)
    return {"reward_chosen": cr, "reward_rejected": rr, "valid": valid_pairs(batch)}


def pair_datasets(config, image_size: int, seed: int, part: str = "train", mix: bool = True, **_):
    """-> (datasets of raw pairs, weights): shapes pairs of both tasks (`data.source=shapes`, mixed by
    `data.und_ratio` / `data.gen_ratio`), or the pairs of the `data.pref_jsonl` files (comma-separated;
    held out: `data.eval_pref_jsonl`, else the `data.eval_split` end of each file)."""
    data = config.data
    if data.source == "shapes":
        dsets, weights = datasets.task_datasets(data, image_size, seed, turns=1, part=part, mix=mix)
        return [d.map(preference.ShapesPairs(seed, image_size)) for d in dsets], weights
    if data.source != "files":
        raise ValueError(f"data.source={data.source!r}: expected 'shapes' or 'files'")
    held = part == "heldout" and bool(data.eval_pref_jsonl)
    if data.pref_jsonl and data.pref_arrayrecord:
        raise ValueError("set data.pref_jsonl or data.pref_arrayrecord, not both")
    packed = bool(data.pref_arrayrecord) and not held
    files = [f for f in str(data.eval_pref_jsonl if held else data.pref_jsonl).split(",") if f]
    fraction = 0.0 if data.eval_pref_jsonl else float(data.eval_split)
    if part == "heldout" and not held and fraction <= 0:
        return [], []
    limits = datasets.image_limits(data)
    if packed:
        srcs = [arrayrecord.ArrayRecordSource(datasets.expand_files(data.pref_arrayrecord),
                                              limits)]
    elif files:
        srcs = [preference.PreferenceJsonl(f, str(data.pref_image_root), limits) for f in files]
    else:
        raise ValueError("train.objective=dpo with data.source=files needs data.pref_jsonl or data.pref_arrayrecord "
                         "(preference pairs: docs/preference.md)")
    out, sizes = [], []
    for i, src in enumerate(srcs):
        ds = grain.MapDataset.source(records.skip_bad(src, bool(data.skip_bad_records)))
        if not held:
            ds = datasets.split_part(ds, fraction, part)
        sizes.append(float(len(ds)))
        out.append(pipe.repeat_epochs(ds, seed=seed + 7919 * i) if part == "train" else ds)
    return out, sizes  # files mix by their sizes


class DPO(Objective):
    name = "dpo"
    uses_reference = True

    def settings(self, config, images_per_row) -> Settings:
        d, loss = config.dpo, config.loss
        return Settings(beta=float(d.beta), loss_type=d.loss_type, label_smoothing=float(d.label_smoothing),
                        sft_weight=float(d.sft_weight), chunk_size=int(loss.chunk_size), guidance=float(d.guidance),
                        images_per_row=images_per_row, group_weight=float(loss.group_weight),
                        balance_weight=float(loss.balance_weight), z_weight=float(loss.z_weight))

    def check(self, config) -> None:
        d = config.dpo
        if d.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type={d.loss_type!r}: expected one of {LOSS_TYPES}")
        if not d.beta > 0:
            raise ValueError(f"dpo.beta={d.beta} must be > 0")
        if not 0 <= d.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
        if not d.guidance >= 1:
            raise ValueError(f"dpo.guidance={d.guidance} must be >= 1 (1: the conditional model)")
        if d.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight={d.sft_weight} must be >= 0")
        if config.data.packing:
            raise ValueError("data.packing=True: train.objective=dpo trains on pairs of rows, which do not pack")
        if config.loss.aia_weight:
            raise ValueError("loss.aia_weight > 0: the AIA loss is not part of train.objective=dpo (set it to 0)")

    def functions(self, config, images_per_row, num_layers=0):
        s = self.settings(config, images_per_row)

        def loss_fn(model, batch, whole=None, reference=None):
            return dpo_loss(model, batch, settings=s, whole=whole, reference=reference)

        def eval_fn(model, batch, reference=None):
            return dpo_eval(model, batch, settings=s, reference=reference)

        return loss_fn, eval_fn

    def datasets(self, config, image_size, seed, **kw):
        return pair_datasets(config, image_size, seed, **kw)

    def encoder(self, tokenizer, layout, kinds=()):
        return preference.EncodePair(tokenizer, layout)

    def batch_spec(self, layout, batch_size):
        return preference.pair_batch_spec(layout, batch_size)


register(DPO())


@evaluators.register("preference_heldout")
class PreferenceHeldout(evaluators.Evaluator):
    """Held-out preference pairs of a `train.objective=dpo` run every `train.eval_every` steps: the
    mean chosen and rejected rewards, their margin and the preference accuracy (`pref/`). Shapes
    pairs come from held-out scenes; files from `data.eval_pref_jsonl`."""

    label = "pref"
    prefix = "pref/"

    @classmethod
    def create(cls, ctx):
        if ctx.config.train.objective != DPO.name:
            return None
        self = cls(ctx)
        return self if self.batches else None

    def __init__(self, ctx):
        config, obj = ctx.config, get(DPO.name)
        seed = config.seed + datasets.HELD_OUT_SEED_OFFSET
        dsets, weights = obj.datasets(config, ctx.layout.image_size, seed, part="heldout", mix=False)
        self.batches = []
        if dsets:
            it = iter(pipe.batches(dsets, weights, tokenizer=ctx.tokenizer, layout=ctx.layout,
                                   batch_size=config.train.batch_size, seed=seed,
                                   encoder=obj.encoder(ctx.tokenizer, ctx.layout)))
            self.batches = evaluators.device_rows(config, [next(it) for _ in range(config.train.eval_batches)])
        self.mesh, self.every = ctx.mesh, int(config.train.eval_every)
        graphdef, scale, eval_fn = ctx.graphdef, ctx.lora_scale, ctx.eval_fn
        self._fn = jax.jit(lambda p, f, b: eval_fn(merged_model(graphdef, p, f, scale), b,
                                                   reference=reference_model(graphdef, p, f)))

    def __call__(self, params, frozen) -> dict[str, float]:
        rows = [to_host(self._fn(params, frozen, sharding.put_batch(b, self.mesh))) for b in self.batches]
        r = {k: np.concatenate([x[k] for x in rows]) for k in rows[0]}
        v = r["valid"].astype(bool)
        if not v.any():
            return {}
        c, j = r["reward_chosen"][v], r["reward_rejected"][v]
        return {"reward_chosen": float(c.mean()), "reward_rejected": float(j.mean()),
                "reward_margin": float((c - j).mean()), "reward_accuracy": float((c > j).mean()), "pairs": int(v.sum())}
