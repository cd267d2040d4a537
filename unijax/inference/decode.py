"""Jitted autoregressive decoding over the static KV cache.

- `generate_text`: answers (MMU): prefill the (left-padded) prompt with its images, then a
  `lax.while_loop` of single-token steps that stops when every row has produced EOS.
- `generate_image_codes`: T2I with classifier-free guidance: conditional and unconditional rows
  (by default the prompt blanked to padding except BOS and begin-of-image, as Janus-Pro does; or a
  given negative prompt) decode together for exactly the image's slots in a `lax.scan`; logits
  `u + s (c - u)`. For Emu3 the slots are rows of codes each ended by the end-of-line token, which
  is forced (as transformers' `prefix_allowed_tokens_fn` does), and codes are sampled over the
  LM head's visual-token columns (`Emu3.image_logits`); the same argmax as transformers' CFG on
  log-probabilities, whose per-row normalisers do not change it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unijax.contract import MMU, T2I, TEXT
from unijax.inference.sampling import Sampling, sample, sample_rows
from unijax.models import family
from unijax.models.decoder import KVCache
from unijax.models.janus import Janus

Array = jax.Array


def prompt_positions(mask: Array) -> Array:
    """Positions for a left-padded prompt: 0.. over the real tokens (padding gets 0)."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _generate_text(graphdef, state, tokens, modality, mask, pixels, rng, *, max_new_tokens: int,
                   sampling: Sampling):
    model: Janus = nnx.merge(graphdef, state)
    cfg = model.cfg
    b, t = tokens.shape
    mask = mask.astype(jnp.int32)
    positions = prompt_positions(mask)
    cache = KVCache.init(cfg, b, t + max_new_tokens)
    h, cache = model(tokens, modality, positions, mask, pixels, cache, task=jnp.full_like(tokens, MMU))
    rng, key = jax.random.split(rng)
    first = sample(model.text_logits(h[:, -1]), key, sampling)
    out = jnp.full((b, max_new_tokens), cfg.text.pad_token_id, jnp.int32).at[:, 0].set(first)
    done = first == cfg.text.eos_token_id
    last_pos = positions[:, -1]

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, out, done, pos, rng = carry
        prev = out[:, i - 1]
        x = model.language_model.embed_tokens(prev[:, None])
        h, cache = model.decode_embeds(x, (pos + 1)[:, None], jnp.ones((b, 1), jnp.int32), cache,
                                       task=jnp.full((b, 1), MMU, jnp.int32))
        rng, key = jax.random.split(rng)
        nxt = sample(model.text_logits(h[:, -1]), key, sampling)
        nxt = jnp.where(done, cfg.text.pad_token_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, cache, out, done | (nxt == cfg.text.eos_token_id), pos + 1, rng

    _, _, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done, last_pos, rng))
    return out


def _row_load(aux, b: int):
    """Each row's expert assignments per TA-MoE layer `[L, b, X]` (zeros `[0, b, 0]` for a dense model)."""
    return aux["row_load"][:, :b] if "row_load" in aux else jnp.zeros((0, b, 0), jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_text(graphdef, state, tokens, modality, mask, pixels, *, cache_len: int):
    """The prompt of a step-wise answer: (last-position text logits `[B, V]`, cache, last positions,
    the prompt's expert assignments per row)."""
    model: Janus = nnx.merge(graphdef, state)
    b, _ = tokens.shape
    positions = prompt_positions(mask.astype(jnp.int32))
    cache = KVCache.init(model.cfg, b, cache_len)
    h, cache, aux = model(tokens, modality, positions, mask.astype(jnp.int32), pixels, cache,
                          task=jnp.full_like(tokens, MMU), return_aux=True)
    return model.text_logits(h[:, -1]), cache, positions[:, -1], _row_load(aux, b)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step_text(graphdef, state, logits, cache, pos, step, keys, temperature, top_k, top_p):
    """Samples each row's next token from `logits` (row key: `fold_in(keys[i], step)`) and runs it
    through the decoder: (token `[B]`, next logits, cache, position, its expert assignments per row)."""
    model: Janus = nnx.merge(graphdef, state)
    b = logits.shape[0]
    token = sample_rows(logits, jax.vmap(lambda k: jax.random.fold_in(k, step))(keys), temperature, top_k, top_p)
    x = model.language_model.embed_tokens(token[:, None])
    h, cache, aux = model.decode_embeds(x, (pos + 1)[:, None], jnp.ones((b, 1), jnp.int32), cache,
                                        task=jnp.full((b, 1), MMU, jnp.int32), return_aux=True)
    return token, model.text_logits(h[:, -1]), cache, pos + 1, _row_load(aux, b)


class TextStream:
    """A step-wise answer for a batch of left-padded prompts, one token per `step()`, each row with
    its own sampling settings and key (`Generator.stream`). Greedy rows give `Generator.text`'s tokens.
    `load` is the prompt's expert assignments per TA-MoE layer and row (`[L, B, X]` numpy; `[0, B, 0]`
    for a dense model), and `step` returns those of the token it sampled and fed back."""

    def __init__(self, gen: Generator, tokens, modality, mask, pixels, *, cache_len: int, keys, temperature,
                 top_k, top_p):
        self.gen, self.i = gen, 0
        self.logits, self.cache, self.pos, load = _prefill_text(gen.graphdef, gen.state, tokens, modality, mask,
                                                                pixels, cache_len=cache_len)
        self.load = np.asarray(load)
        self.keys = keys
        self.settings = (jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                         jnp.asarray(top_p, jnp.float32))

    def step(self) -> tuple[np.ndarray, Array]:
        """(the next token of every row `[B]` (numpy), its expert assignments `[L, B, X]` (left on the
        device), as it is fed back to give the following logits); rows past their EOS keep producing,
        to be ignored."""
        token, self.logits, self.cache, self.pos, load = _step_text(
            self.gen.graphdef, self.gen.state, self.logits, self.cache, self.pos, jnp.int32(self.i), self.keys,
            *self.settings)
        self.i += 1
        return np.asarray(token), load


class Generator:
    """Splits a model once (graph + parameter state) and runs the jitted decoding programs.

    Splitting costs milliseconds of Python per call at small sizes, so repeated decoding should
    go through one `Generator`; the module-level functions build one per call. Rebuild it after
    the model's parameters change.
    """

    def __init__(self, model: Janus):
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.vq_graphdef, self.vq_state = nnx.split(model.vqmodel)

    def text(self, tokens: Array, modality: Array, mask: Array, pixels: Array | None = None, *,
             max_new_tokens: int = 32, sampling: Sampling = Sampling(), rng=None) -> Array:
        """Answers for left-padded prompts `tokens/modality/mask [B, T]` (and their pixels).

        Returns `[B, max_new_tokens]` token ids; after a row's EOS the rest is padding.
        """
        rng = jax.random.key(0) if rng is None else rng
        return _generate_text(self.graphdef, self.state, tokens, modality, mask, pixels, rng,
                              max_new_tokens=max_new_tokens, sampling=sampling)

    def stream(self, tokens: Array, modality: Array, mask: Array, pixels: Array | None = None, *, cache_len: int,
               keys, temperature, top_k, top_p) -> TextStream:
        """A step-wise answer (`TextStream`) for left-padded prompts `[B, T]`, the cache holding
        `cache_len` positions (prompt + new tokens); per-row `keys [B]`, `temperature`, `top_k`, `top_p`."""
        return TextStream(self, tokens, modality, mask, pixels, cache_len=cache_len, keys=keys,
                          temperature=temperature, top_k=top_k, top_p=top_p)

    def image_codes(self, tokens: Array, mask: Array, *, guidance: float = 5.0,
                    sampling: Sampling = Sampling(temperature=1.0), rng=None, num_tokens: int | None = None,
                    return_logits: bool = False, uncond: tuple[Array, Array] | None = None,
                    return_load: bool = False, row_sampling: tuple | None = None):
        """VQ codes `[B, grid * grid]` for left-padded T2I prompts `tokens/mask [B, T]`.

        The prompt should end with the begin-of-image token (Emu3: with `<|image start|>h*w<|image
        token|>`). `guidance` is the CFG scale. `rng`: one key, or a key per row (`[B]`, from
        `jax.random.key`) so that each row's samples do not depend on the rest of the batch.
        `guidance` may be one scale per row (`[B]`).
        `uncond`: the unconditional rows `(tokens, mask)`, left-padded to the same length (default:
        `unconditional_prompt`). `num_tokens`: decode only the first slots (Emu3: slots include the
        end-of-line ones). With `return_logits`, also the guided code logits of every code step.
        With `return_load` (last), each conditional row's expert assignments per TA-MoE layer over its
        prompt and the codes it fed back, `[L, B, X]` (a served image's routing). `row_sampling`:
        per-row `(temperature, top_k, top_p)` arrays `[B]` instead of `sampling` (traced: one compiled
        program for every setting; needs a key per row; the same draws as `sampling` would give).
        """
        rng = jax.random.key(0) if rng is None else rng
        if uncond is None:
            uncond = (unconditional_prompt(tokens, self.cfg), mask)
        return _generate_image_codes(self.graphdef, self.state, tokens, mask, uncond[0], uncond[1],
                                     jnp.asarray(guidance, jnp.float32), rng, num_tokens=num_tokens or self.cfg.vq.num_tokens,
                                     sampling=sampling, return_logits=return_logits, return_load=return_load,
                                     row_sampling=row_sampling)

    def decode_images(self, codes: Array) -> Array:
        """VQ codes `[B, N]` -> pixels `[B, H, W, C]` in [-1, 1]."""
        return _decode(self.vq_graphdef, self.vq_state, codes)


def generate_text(model: Janus, *args, **kwargs) -> Array:
    """`Generator(model).text(...)`."""
    return Generator(model).text(*args, **kwargs)


def guided_logits(cond: Array, uncond: Array, scale) -> Array:
    """Classifier-free guidance: `uncond + scale (cond - uncond)` (`scale` broadcast over the vocab)."""
    return uncond + scale * (cond - uncond)


def unconditional_prompt(tokens: Array, cfg) -> Array:
    """The CFG null prompt: the tokens the family keeps (`Family.unconditional_keep`; Janus-Pro: BOS and
    begin-of-image; Emu3: BOS and the image header), the caption as padding."""
    return family.null_prompt(tokens, cfg)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "sampling", "return_logits", "return_load"))
def _generate_image_codes(graphdef, state, tokens, mask, uncond_tokens, uncond_mask, guidance, rng, *,
                          num_tokens: int, sampling: Sampling, return_logits: bool, return_load: bool = False,
                          row_sampling=None):
    model: Janus = nnx.merge(graphdef, state)
    cfg = model.cfg
    fam = family.of(cfg)
    b, t = tokens.shape
    rows = jnp.concatenate([tokens, uncond_tokens], axis=0)
    mask2 = jnp.concatenate([mask, uncond_mask], axis=0).astype(jnp.int32)
    positions = prompt_positions(mask2)
    cache = KVCache.init(cfg, 2 * b, t + num_tokens)
    h, cache, aux = model(rows, jnp.full_like(rows, TEXT), positions, mask2, None, cache, task=jnp.full_like(rows, T2I),
                          return_aux=True)
    load = _row_load(aux, b) if return_load else jnp.zeros((0, b, 0), jnp.float32)  # nothing carried unless asked

    per_row = rng.shape == (b,)  # one key per row: each row's samples are independent of the batch

    def pick(h, key):
        logits = model.image_logits(h[:, -1]).astype(jnp.float32)
        cond, uncond = logits[:b], logits[b:]
        guided = guided_logits(cond, uncond, guidance if guidance.ndim == 0 else guidance[:, None])
        if row_sampling is not None:
            nxt = sample_rows(guided, key, *row_sampling)
        elif per_row:
            nxt = jax.vmap(lambda g, k: sample(g[None], k, sampling)[0])(guided, key)
        else:
            nxt = sample(guided, key, sampling)
        return nxt, (guided if return_logits else None)

    if per_row:
        row_keys = jax.vmap(lambda k: jax.random.split(k, num_tokens))(rng)  # [B, num_tokens]
        key, keys = row_keys[:, 0], row_keys[:, 1:].swapaxes(0, 1)
    else:
        rng, key = jax.random.split(rng)
        keys = jax.random.split(rng, num_tokens - 1)
    first, first_logits = pick(h, key)

    def step(carry, xs):
        code, cache, pos, load = carry
        key, slot = xs  # slot of `code`; this step predicts slot + 1
        x = fam.embed_image_slot(model, jnp.concatenate([code, code])[:, None], slot)
        h, cache, aux = model.decode_embeds(x, (pos + 1)[:, None], jnp.ones((2 * b, 1), jnp.int32), cache,
                                            task=jnp.full((2 * b, 1), T2I, jnp.int32), return_aux=True)
        nxt, logits = pick(h, key)
        if return_load:
            load = load + _row_load(aux, b)
        return (nxt, cache, pos + 1, load), (nxt, logits)

    slots = jnp.arange(num_tokens - 1, dtype=jnp.int32)
    (_, _, _, load), (rest, rest_logits) = jax.lax.scan(step, (first, cache, positions[:, -1], load), (keys, slots))
    codes = jnp.concatenate([first[:, None], rest.T], axis=1)
    logits = (jnp.concatenate([first_logits[:, None], rest_logits.transpose(1, 0, 2)], axis=1)
              if return_logits else None)
    idx = fam.code_slots(cfg, num_tokens)  # slots that hold codes (Emu3: not the end-of-line ones)
    if idx is not None:
        codes = codes[:, idx]
        logits = logits[:, idx] if return_logits else None
    out = (codes,) + ((logits,) if return_logits else ()) + ((load,) if return_load else ())
    return out if len(out) > 1 else codes


def generate_image_codes(model: Janus, *args, **kwargs):
    """`Generator(model).image_codes(...)`."""
    return Generator(model).image_codes(*args, **kwargs)


def decode_images(model: Janus, codes: Array) -> Array:
    """VQ codes `[B, N]` -> pixels `[B, H, W, C]` in [-1, 1] (jitted)."""
    graphdef, state = nnx.split(model.vqmodel)
    return _decode(graphdef, state, codes)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, codes):
    return nnx.merge(graphdef, state).decode(codes)
