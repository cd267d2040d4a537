"""A TA-MoE Janus exports to a transformers directory with its modeling code (`trust_remote_code`):
logits equal unijax's, `generate()` decodes text and images, and the export converts back.

Tolerance (float32): max |ours - transformers| <= 1e-4 x max |transformers|, the parity tests' rule.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import BOI, BOS, IMAGE_TOKEN, check_cfg_image_generation, check_greedy_text, close, make_tiny_janus

from unijax import checkpoints
from unijax.contract import TEXT, UND_IMAGE
from unijax.hf.convert import ConversionError, checkpoint_to_hf, hf_to_checkpoint
from unijax.models import family
from unijax.models.config import MoEConfig
from unijax.models.family import preset
from unijax.training.upcycle import upcycle


def load_exported(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()


@pytest.fixture(scope="module", params=["label", pytest.param("soft", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    """A tiny converted Janus upcycled to TA-MoE (experts with 50 % noise, unit-scale routers so that
    routing varies by token; layer 0 only for `soft`), saved, exported."""
    d = tmp_path_factory.mktemp(request.param)
    make_tiny_janus(d / "hf", gqa=True, seed=3)
    hf_to_checkpoint(d / "hf", d / "dense")
    base = checkpoints.load_model(d / "dense")
    layers = (0,) if request.param == "soft" else ()
    moe = MoEConfig(num_experts_per_group=3, top_k=2, group_assignment=request.param, layers=layers)
    model = upcycle(base, None, None, moe, noise=0.5, router_std=1.0, seed=1)
    checkpoints.save_model(d / "moe", model)
    checkpoint_to_hf(d / "moe", d / "out")
    # unijax decodes an export's way: the task router picks the group ('label' needs the batch's task)
    routed = dataclasses.replace(model.cfg, moe=dataclasses.replace(
        moe, group_assignment="soft" if request.param == "soft" else "router", impl="dropless"))  # no capacity drops
    routed_model = family.build(routed, nnx.Rngs(0))
    nnx.update(routed_model, nnx.state(model, nnx.Param))
    model = routed_model
    return model, load_exported(d / "out"), d


def prompt():
    ids = [BOS, 5, 6] + [IMAGE_TOKEN] * 16 + [7, 8, 9]
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    return torch.tensor([ids]), pixels


def test_export_writes_code_and_config(exported):
    _, hf, d = exported
    cfg = json.loads((d / "out/config.json").read_text())
    assert cfg["model_type"] == "janus_ta_moe" and cfg["architectures"] == ["JanusTAMoEForConditionalGeneration"]
    assert cfg["ta_moe"]["group_assignment"] in ("router", "soft") and (d / "out/modeling_ta_moe.py").is_file()
    assert type(hf.model.language_model.layers[0].mlp).__name__ == "TAMoEMLP"


def test_understanding_logits_match(exported):
    model, hf, _ = exported
    ids, pixels = prompt()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=torch.tensor(pixels)).logits.numpy()
    tok = jnp.asarray(ids.numpy())
    mod = jnp.where(tok == IMAGE_TOKEN, UND_IMAGE, TEXT)
    h, _ = model(tok, mod, jnp.arange(tok.shape[1])[None], jnp.ones_like(tok),
                 jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None])
    close(model.text_logits(h), ref)
    # routing is not trivial: layer 0 sends this prompt's tokens to experts of both groups
    mlp, seen = hf.model.language_model.layers[0].mlp, []
    hook = mlp.register_forward_hook(lambda m, args, out: seen.append(m.route(args[0].reshape(-1, 64))[0]))
    with torch.no_grad():
        hf(input_ids=ids, pixel_values=torch.tensor(pixels))
    hook.remove()
    assert (seen[0] < mlp.n).any() and (seen[0] >= mlp.n).any()


def test_generate_decodes_images_as_unijax(exported):
    """`generate(generation_mode="image")`, greedy with CFG 3: the codes equal unijax's decoder's, and
    the teacher-forced guided image-head logits match along them."""
    model, hf, _ = exported
    check_cfg_image_generation(hf, model, torch.tensor([[BOS, 10, 11, 12, 13, BOI], [BOS, 20, 21, 22, 23, BOI]]))


def test_generate_decodes_text_as_unijax(exported):
    model, hf, _ = exported
    ids, pixels = prompt()
    check_greedy_text(hf, model, ids, pixels, max_new_tokens=8)


def test_export_converts_back(exported, tmp_path):
    model, _, d = exported
    cfg = hf_to_checkpoint(d / "out", tmp_path / "back")
    assert cfg.ffn == "ta_moe" and cfg.moe.num_experts_per_group == 3
    back = checkpoints.flat_params(checkpoints.load_model(tmp_path / "back"))
    for path, x in checkpoints.flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(x), err_msg=path)


def test_emu3_ta_moe_export_is_refused_in_one_line(tmp_path):
    cfg = preset("tiny", family="emu3")
    cfg = dataclasses.replace(cfg, ffn="ta_moe", moe=MoEConfig(num_experts_per_group=2, top_k=1)).validate()
    checkpoints.save_model(tmp_path / "ckpt", family.build(cfg, nnx.Rngs(0)))
    with pytest.raises(ConversionError, match="emu3 TA-MoE model does not export") as e:
        checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
