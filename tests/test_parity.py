"""unijax Janus == transformers JanusForConditionalGeneration on tiny random models.

Tolerance (float32): max |ours - reference| <= 1e-4 * max |reference|. A bfloat16 run (weights
and activations) must agree within 3e-2 * max |reference|.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import BOI, BOS, IMAGE_TOKEN, check_cfg_image_generation, check_greedy_text, close, make_tiny_janus

from unijax import checkpoints
from unijax.contract import TEXT, UND_IMAGE
from unijax.hf.convert import hf_to_checkpoint
from unijax.inference import decode


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_janus(d / "hf", gqa=request.param == "gqa", seed=1)
    hf_to_checkpoint(d / "hf", d / "ckpt")
    return hf, checkpoints.load_model(d / "ckpt"), d


def und_prompt(n_text_after=4):
    ids = [BOS, 5, 6] + [IMAGE_TOKEN] * 16 + list(range(7, 7 + n_text_after))
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    return torch.tensor([ids]), pixels


def ours_inputs(ids, pixels):
    tok = jnp.asarray(ids.numpy())
    return tok, jnp.where(tok == IMAGE_TOKEN, UND_IMAGE, TEXT), jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None]


def test_vision_features(pair):
    hf, model, _ = pair
    _, pixels = und_prompt()
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.tensor(pixels)).pooler_output.numpy()
    close(model.image_features(jnp.asarray(pixels.transpose(0, 2, 3, 1))), ref)


def test_understanding_logits(pair):
    hf, model, _ = pair
    ids, pixels = und_prompt()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=torch.tensor(pixels)).logits.numpy()
    tok, mod, px = ours_inputs(ids, pixels)
    t = tok.shape[1]
    h, _ = model(tok, mod, jnp.arange(t)[None], jnp.ones_like(tok), px)
    close(model.text_logits(h), ref)


def test_vq_decode(pair):
    hf, model, _ = pair
    codes = np.random.default_rng(1).integers(0, model.cfg.vq.num_embeddings, (2, model.cfg.vq.num_tokens))
    with torch.no_grad():
        ref = hf.model.vqmodel.decode(torch.tensor(codes)).numpy().transpose(0, 2, 3, 1)
    close(decode.decode_images(model, jnp.asarray(codes)), ref)


def test_image_generation_cfg_loop(pair):
    hf, model, _ = pair
    ids = torch.tensor([[BOS, 10, 11, 12, 13, BOI], [BOS, 20, 21, 22, 23, BOI]])
    assert check_cfg_image_generation(hf, model, ids, 3.0).shape[1] >= 16


def test_text_generation_greedy(pair):
    hf, model, _ = pair
    ids, pixels = und_prompt()
    check_greedy_text(hf, model, ids, pixels, max_new_tokens=12)


def test_bfloat16_run(pair):
    hf, _, d = pair
    model = checkpoints.load_model(d / "ckpt", param_dtype="bfloat16", dtype="bfloat16")
    ids, pixels = und_prompt()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=torch.tensor(pixels)).logits.numpy()
    tok, mod, px = ours_inputs(ids, pixels)
    h, _ = model(tok, mod, jnp.arange(tok.shape[1])[None], jnp.ones_like(tok), px)
    close(model.text_logits(h).astype(jnp.float32), ref, rtol=3e-2)
