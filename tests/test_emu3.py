"""Emu3 against transformers' `Emu3ForConditionalGeneration` on a tiny random model (tests/hf_models.py):
VQ encode codes and decode pixels, understanding logits on a prompt with an image, greedy
image-token generation with classifier-free guidance, and conversion in both directions.
Tolerances as for Janus (float32, `jax_default_matmul_precision=highest`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models as hm
from unijax import checkpoints
from unijax.hf.convert import ConversionError, checkpoint_to_hf, hf_to_checkpoint
from unijax.models.emu3 import Emu3
from unijax.models.janus import TEXT, UND_IMAGE

SIZE = 32       # pixels
GRID = 8        # codes per side (VQ downsampling 4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, unijax model converted from its saved directory, directories)."""
    root = tmp_path_factory.mktemp("emu3")
    hf_dir, ckpt = root / "hf", root / "ckpt"
    ref = hm.make_tiny_emu3(hf_dir)
    hf_to_checkpoint(hf_dir, ckpt, image_size=SIZE)
    return ref, checkpoints.load_model(ckpt), hf_dir, ckpt


def images(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_vq_encode_codes_and_decode_pixels(pair):
    ref, model, *_ = pair
    x = images(3)
    with torch.no_grad():
        out = ref.model.vqmodel.encode(to_torch(x), torch.tensor([[SIZE, SIZE]] * 3))
        want_codes = torch.stack(out.image_tokens).numpy()
        want_pixels = ref.model.vqmodel.decode(torch.stack(out.image_tokens)).numpy().transpose(0, 2, 3, 1)
        latents = ref.model.vqmodel.quant_conv(out.last_hidden_state.permute(0, 2, 1, 3, 4))[:, :, 0]
    codes = np.asarray(model.vqmodel.encode(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(model.vqmodel.encode_latents(jnp.asarray(x))),
                               latents.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    assert codes.shape == (3, GRID, GRID) and len(np.unique(codes)) > 8
    np.testing.assert_array_equal(codes, want_codes)
    pixels = np.asarray(model.vqmodel.decode(jnp.asarray(want_codes)))
    np.testing.assert_allclose(pixels, want_pixels, rtol=1e-4, atol=1e-4)
    # the vocabulary layout: codes as visual-token ids, each row ended by end-of-line
    ids = np.asarray(model.image_token_ids(jnp.asarray(x)))
    with torch.no_grad():
        want_ids = ref.model.get_image_tokens(to_torch(x), torch.tensor([[SIZE, SIZE]] * 3)).numpy()
    np.testing.assert_array_equal(ids.reshape(-1), want_ids)
    np.testing.assert_array_equal(np.asarray(model.ids_to_codes(jnp.asarray(ids), GRID, GRID)), codes)


def understanding_prompt(n_images=1):
    """BOS, a few text ids, the image's placeholders (h x (w + 1), as transformers' processor expands
    `<image>`), more text."""
    ph = GRID * (GRID + 1)
    ids, modality = [hm.BOS, 11, 12, hm.EMU3_SPECIALS["<|image start|>"]], [TEXT] * 4
    for _ in range(n_images):
        ids += [hm.EMU3_SPECIALS["<image>"]] * ph
        modality += [UND_IMAGE] * ph
    ids += [hm.EMU3_SPECIALS["<|image end|>"], 21, 22, 23, 24]
    modality += [TEXT] * 5
    return np.asarray([ids], np.int32), np.asarray([modality], np.int32)


def test_understanding_logits(pair):
    ref, model, *_ = pair
    ids, modality = understanding_prompt()
    x = images(1, seed=1)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=to_torch(x),
                   image_sizes=torch.tensor([[SIZE, SIZE]])).logits.numpy()
    t = ids.shape[1]
    h, _ = model(jnp.asarray(ids), jnp.asarray(modality), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32),
                 pixels=jnp.asarray(x)[:, None])
    got = np.asarray(model.text_logits(h))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.array_equal(got[0].argmax(-1), want[0].argmax(-1))


def test_conversion_round_trip_and_refusals(pair, tmp_path):
    ref, model, hf_dir, ckpt = pair
    out = tmp_path / "back"
    checkpoint_to_hf(ckpt, out)
    from transformers import Emu3ForConditionalGeneration

    back = Emu3ForConditionalGeneration.from_pretrained(out).eval()
    sd, sd_ref = back.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(sd[k].numpy(), sd_ref[k].numpy(), err_msg=k)
    # a tensor too many, and a vocabulary map without the visual tokens, are refused naming them
    bad = tmp_path / "bad"
    hm.make_tiny_emu3(bad)
    from safetensors.numpy import load_file, save_file

    w = load_file(bad / "model.safetensors")
    w["model.text_model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="extra.weight"):
        hf_to_checkpoint(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["vocabulary_map"] = {k: v for k, v in cfg["vocabulary_map"].items() if "visual" not in k}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="visual token"):
        hf_to_checkpoint(bad, tmp_path / "y")


def test_greedy_cfg_generation_matches_transformers(pair):
    """Greedy image-token generation with CFG (scale 3, a negative prompt), every slot of an 8 x 8
    image (72 tokens, end-of-line forced at each row end as transformers' `prefix_allowed_tokens_fn`
    does, then end-of-frame): identical tokens."""
    from unijax.inference.decode import Generator
    from unijax.inference.sampling import Sampling

    ref, model, *_ = pair
    s = hm.EMU3_SPECIALS
    header = [s["<|image start|>"], 58, 42, 58, s["<|image token|>"]]  # "<|image start|>8*8<|image token|>"
    cond = [hm.BOS, 31, 32, 33, 34] + header
    neg = [hm.BOS, 35] + header
    visual = list(range(hm.EMU3_OFFSET, hm.EMU3_OFFSET + hm.EMU3_CODES))
    slots = GRID * (GRID + 1)

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - int(torch.nonzero(input_ids == s["<|image token|>"])[0][0])
        if offset % (GRID + 1) == 0:
            return [s["<|extra_200|>"]]
        if offset == slots + 1:
            return [s["<|extra_201|>"]]
        return visual

    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([cond]), attention_mask=torch.ones(1, len(cond), dtype=torch.long),
                           max_new_tokens=slots + 1, do_sample=False, guidance_scale=3.0,
                           negative_prompt_ids=torch.tensor([neg]),
                           negative_prompt_attention_mask=torch.ones(1, len(neg), dtype=torch.long),
                           prefix_allowed_tokens_fn=allowed)
    want = out[0, len(cond):].numpy()
    assert want[-1] == s["<|extra_201|>"]
    pad = len(cond) - len(neg)
    tokens, mask = jnp.asarray([cond]), jnp.ones((1, len(cond)), jnp.int32)
    uncond = (jnp.asarray([[hm.PAD] * pad + neg]), jnp.asarray([[0] * pad + [1] * len(neg)]))
    codes = Generator(model).image_codes(tokens, mask, guidance=3.0, sampling=Sampling(temperature=0.0),
                                         uncond=uncond)
    ids = np.asarray(model.codes_to_ids(codes.reshape(1, GRID, GRID)))[0]
    assert len(np.unique(np.asarray(codes))) > 4  # not a constant image
    np.testing.assert_array_equal(ids, want[:slots])
