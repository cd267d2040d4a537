"""Emu3 against transformers' `Emu3ForConditionalGeneration` on a tiny random model (tests/hf_models.py):
VQ encode codes and decode pixels, understanding logits on a prompt with an image, greedy
image-token generation with classifier-free guidance, and conversion in both directions.
Tolerances as for Janus (float32, `jax_default_matmul_precision=highest`)."""

import json

import envs
import hf_models as hm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unijax import checkpoints, contract
from unijax.contract import TEXT, UND_IMAGE
from unijax.hf.convert import ConversionError, checkpoint_to_hf, hf_to_checkpoint
from unijax.models import forward

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


def test_vq_losses_on_the_emu3_tokenizer(pair):
    """Stage 0's losses (`unijax.training.vq_loss`) on Emu3's VQ-VAE: the straight-through forward
    reconstructs exactly what transformers decodes from its own codes (1e-4); each term sends gradient
    where it should (the codebook only from the codebook loss, the BatchNorm running statistics from
    none). The slow recipe test below trains it through `configs/stage0_vq.py`."""
    from flax import nnx

    from unijax.training import vq_loss as V

    ref, model, *_ = pair
    vq = nnx.clone(model.vqmodel)
    x = images(2, seed=5)
    with torch.no_grad():
        codes = ref.model.vqmodel.encode(to_torch(x), torch.tensor([[SIZE, SIZE]] * 2)).image_tokens
        want = ref.model.vqmodel.decode(torch.stack(codes)).numpy().transpose(0, 2, 3, 1)
    recon, aux = V.vq_forward(vq, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(aux["codes"]).reshape(2, GRID, GRID), torch.stack(codes).numpy())
    np.testing.assert_allclose(np.asarray(recon), want, rtol=1e-4, atol=1e-4)

    names = ("recon_loss", "codebook_loss", "commit_loss")
    graphdef, params, rest = nnx.split(vq, nnx.Param, ...)
    rows = jax.jit(jax.jacrev(lambda p: jnp.stack([V.vq_losses(nnx.merge(graphdef, p, rest), jnp.asarray(x))[1][k]
                                                   for k in names])))(params)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(rows)}

    def norm(i, pred):
        return float(sum(jnp.sum(jnp.square(v[i])) for k, v in flat.items() if pred(k)) ** 0.5)

    book, enc = (lambda k: k.startswith("quantize")), (lambda k: k.startswith(("encoder", "quant_conv")))
    dec = (lambda k: k.startswith(("decoder", "post_quant_conv")))
    stats = (lambda k: "running_" in k)
    assert norm(0, enc) > 0 and norm(0, dec) > 0 and norm(0, book) == 0          # reconstruction
    assert norm(1, book) > 0 and norm(1, enc) == 0 and norm(1, dec) == 0          # codebook
    assert norm(2, enc) > 0 and norm(2, book) == 0 and norm(2, dec) == 0          # commitment
    assert sum(norm(i, stats) for i in range(3)) == 0


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


# -- training on the shapes world ----------------------------------------------------------------
def emu3_layout():
    from unijax.data import pipeline
    from unijax.models.family import preset

    cfg = preset("tiny", "emu3")
    return cfg, pipeline.Layout.from_model(cfg, envs.SHORT_ROWS["max_len"])


def shapes_samples(tmp_path):
    from configs import base
    from unijax.data import datasets
    from unijax.data.tokenizer import load_tokenizer

    c = base.get_config()
    c.data.dir = str(tmp_path)
    c.data.update(envs.SHORT_ROWS)  # one question per image fits the 112-slot layout
    dsets, _ = datasets.task_datasets(c.data, 32, 0)
    return [d[0] for d in dsets], load_tokenizer("shapes", tmp_path)


def test_emu3_layout_rows_end_with_eol_and_images_reassemble(tmp_path):
    """Both directions lay an image out as 8 rows of 8 VQ slots, each followed by end-of-line (a TEXT
    slot with no loss); the slots' patches reassemble the exact image; the T2I loss is on the 64
    positions that predict a code; AIA's keys and queries leave the end-of-line tokens out."""
    from unijax.contract import GEN_IMAGE
    from unijax.data import pipeline
    from unijax.models.image_inputs import gather_images

    cfg, layout = emu3_layout()
    samples, tok = shapes_samples(tmp_path)
    rows = []
    for sample in samples:
        x = pipeline.encode_sample(sample, tok, layout, np.random.default_rng(0))
        kind = UND_IMAGE if sample["task"] == "mmu" else GEN_IMAGE
        is_img = x["modality"] == kind
        eol = np.flatnonzero(x["tokens"] == cfg.eol_token_id)
        assert is_img.sum() == GRID * GRID and len(eol) == GRID
        for e in eol:
            assert is_img[e - GRID:e].all() and x["modality"][e] == TEXT
        assert x["text_weights"][eol].sum() == 0 and x["image_weights"][eol - 1].sum() == 0
        if kind == GEN_IMAGE:
            predicts_code = np.concatenate([is_img[1:], [False]])
            np.testing.assert_array_equal(x["image_weights"] > 0, predicts_code)
        img = gather_images(jnp.asarray(x["patches"][None]), jnp.asarray(is_img[None]), 1, SIZE // GRID, GRID)
        rule = layout.und_image if kind == UND_IMAGE else layout.gen_image
        want = rule(np.asarray(sample["image"], np.uint8)).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(np.asarray(img[0, 0]), want, atol=1e-6)
        rows.append(pipeline.pad_sample(x, layout.max_len))
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in contract.BATCH_KEYS}
    keys, queries, valid = forward.spans(batch, cfg, und_queries="after_image")
    is_eol = batch["tokens"] == cfg.eol_token_id
    assert not jnp.any(keys & is_eol) and not jnp.any(queries["und"] & is_eol)
    assert [s["task"] for s in samples] == ["mmu", "t2i"] and bool(valid["und"][0]) and bool(valid["gen"][1])


def test_emu3_train_inputs_hold_the_vq_codes_of_both_images(tmp_path):
    """The train step fills understanding and generation slots alike with the frozen VQ's codes."""
    from flax import nnx

    from unijax.contract import GEN_IMAGE
    from unijax.data import pipeline
    from unijax.models import family
    from unijax.models.forward import prepare_inputs

    cfg, layout = emu3_layout()
    model = family.build(cfg, nnx.Rngs(0))
    samples, tok = shapes_samples(tmp_path)
    rows = [pipeline.pad_sample(pipeline.encode_sample(s, tok, layout), layout.max_len) for s in samples]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in contract.BATCH_KEYS}
    tokens, pixels = prepare_inputs(model, batch, (1, 1))
    assert pixels is None
    for i, s in enumerate(samples):
        kind = UND_IMAGE if s["task"] == "mmu" else GEN_IMAGE
        rule = layout.und_image if kind == UND_IMAGE else layout.gen_image
        img = rule(np.asarray(s["image"], np.uint8)).astype(np.float32) / 127.5 - 1
        codes = np.asarray(model.vqmodel.encode(jnp.asarray(img[None])))[0].reshape(-1)
        np.testing.assert_array_equal(np.asarray(tokens[i])[np.asarray(batch["modality"][i]) == kind], codes)


@pytest.mark.slow
def test_tiny_emu3_trains_through_the_recipe_to_stage2_with_aia(tmp_path):
    """`--config.model.family=emu3` through the stage configs: stage 0 trains its VQ-VAE (the
    reconstruction error falls), a dense base from it (both task losses fall), stage 1 x 2 from the
    base, upcycling, and stage 2 + AIA (TA-MoE + LoRA), each a CLI run."""
    import subprocess
    import sys

    repo = hm.__file__.rsplit("/tests/", 1)[0]
    env = envs.cli_env()
    common = ["--config.model.family=emu3", "--config.model.text.num_layers=2", f"--config.data.dir={tmp_path}/data",
              "--config.train.batch_size=8", "--config.train.log_every=1", "--config.train.eval_batches=1",
              "--config.train.warmup_steps=2", *envs.SHORT_ROWS_FLAGS]

    def train(cfg, name, steps, *extra):
        cmd = [sys.executable, "-m", "unijax.train", "--config", f"{repo}/configs/{cfg}",
               f"--config.workdir={tmp_path}/{name}", f"--config.train.steps={steps}",
               f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}", *common, *extra]
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    vq = [r for r in train("stage0_vq.py", "vq", 20, "--config.train.learning_rate=3e-3") if "recon_loss" in r]
    assert vq[-1]["recon_loss"] < 0.5 * vq[0]["recon_loss"], (vq[0], vq[-1])
    rows = [r for r in train("base.py", "base", 30, "--config.train.learning_rate=3e-3",
                             f"--config.init_from={tmp_path}/vq/model") if "loss_text" in r]
    assert rows[-1]["loss_text"] < 0.8 * rows[0]["loss_text"] and rows[-1]["loss_image"] < rows[0]["loss_image"]
    init = f"--config.init_from={tmp_path}/base/model"
    train("stage1_und.py", "und", 3, init)
    train("stage1_gen.py", "gen", 3, init)
    up = subprocess.run([sys.executable, "-m", "unijax.upcycle", "--base", f"{tmp_path}/base/model",
                         "--und", f"{tmp_path}/und/model", "--gen", f"{tmp_path}/gen/model", "--out",
                         f"{tmp_path}/upcycled", "--noise", "0.01"], cwd=repo, env=env, capture_output=True,
                        text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    rows = train("stage2.py:aia", "stage2", 4, f"--config.init_from={tmp_path}/upcycled")
    last = [r for r in rows if "loss" in r][-1]
    assert np.isfinite(last["loss"]) and last["aia_samples_gen"] > 0 and last["aia_samples_und"] > 0
    assert checkpoints.read_config(tmp_path / "stage2" / "model").family == "emu3"
