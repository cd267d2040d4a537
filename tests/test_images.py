"""Image preprocessing (`unijax.data.images`) against transformers' Janus and Emu3 image processors.

Tolerance: the pixel values after normalisation agree to 1e-6 (float32 rounding of `x / 127.5 - 1`
against the processors' `(x / 255 - 0.5) / 0.5`); both resample with PIL's bicubic on uint8 (the
`JanusImageProcessorPil` backend, which transformers uses without torchvision), so the resized
pixels are identical and the padding geometry is identical.
"""

import numpy as np
import pytest
from PIL import Image

from unijax.data import images

SHAPES = [(480, 640), (640, 480), (384, 384), (500, 500), (100, 50), (37, 1000), (800, 13), (383, 384)]


def photo(h, w, seed=0):
    """A smooth random image (a photo's spectrum, roughly) with some noise on top."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), np.int16)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


def normalised(x):
    return x.astype(np.float64) / 127.5 - 1.0


@pytest.fixture(scope="module")
def janus_processor():
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    # Janus-Pro's preprocessor_config.json: 384, mean = std = 0.5, min_size 14, bicubic
    return JanusImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  min_size=14, resample=3)


@pytest.mark.parametrize("hw", SHAPES)
def test_janus_rule_matches_janus_image_processor(janus_processor, hw):
    image = photo(*hw)
    ref = np.asarray(janus_processor(images=[image], return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    ours = images.preprocess(image, images.ImageRule("janus", 384))
    assert ours.shape == ref.shape == (384, 384, 3)
    np.testing.assert_allclose(normalised(ours), ref, atol=1e-6)
    # the geometry: the background where the processor padded, the image elsewhere
    h, w = images.janus_size(*hw, 384)
    pad = np.ones((384, 384), bool)
    top, left = (384 - h) // 2 if w >= h else 0, (384 - w) // 2 if h > w else 0
    pad[top:top + h, left:left + w] = False
    assert (ours[pad] == 127).all() and pad.sum() == 384 * (384 - min(h, w))
    assert np.allclose(ref[pad], 127 / 127.5 - 1, atol=1e-6)


def test_janus_rule_keeps_the_whole_image_and_centres_it():
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, :10] = 255  # a white band at the left edge: a centre crop would cut it off
    out = images.resize_pad(image, 32)
    assert out.shape == (32, 32, 3)
    assert images.janus_size(300, 400, 32) == (24, 32)
    assert (out[:4] == 127).all() and (out[-4:] == 127).all()  # 4 rows of padding above and below
    assert out[4:28, 0].min() > 150 and out[4:28, 16].max() < 20  # the band survives, blurred
    assert (images.resize_pad(np.full((32, 32, 3), 9, np.uint8), 32) == 9).all()  # square: unchanged


@pytest.mark.parametrize("side", [64, 100, 37, 512])
def test_emu3_rule_matches_emu3_image_processor_on_squares(side):
    from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

    proc = Emu3ImageProcessor(min_pixels=64 * 64, max_pixels=64 * 64, spatial_factor=8, image_mean=[0.5] * 3,
                              image_std=[0.5] * 3)
    image = photo(side, side, seed=side)
    ref = np.asarray(proc(images=[image], return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    ours = images.preprocess(image, images.ImageRule("emu3", 64, 8))
    assert ref.shape == ours.shape == (64, 64, 3)
    np.testing.assert_allclose(normalised(ours), ref, atol=1e-6)


@pytest.mark.parametrize("hw", [(48, 100), (100, 30), (64, 65)])
def test_emu3_rule_on_other_shapes_resizes_to_factor_multiples_and_pads_bottom_right(hw):
    from transformers.image_transforms import resize
    from transformers.models.emu3.image_processing_emu3 import smart_resize

    image = photo(*hw, seed=1)
    h, w = images.emu3_size(*hw, 64, 8)
    assert max(h, w) == 64 and h % 8 == 0 and w % 8 == 0
    # the content is Emu3's own resize at that size (its smart_resize keeps exactly such sizes)
    assert smart_resize(h, w, factor=8, min_pixels=h * w, max_pixels=h * w) == (h, w)
    ref = resize(image, (h, w), resample=3, input_data_format="channels_last")
    out = images.preprocess(image, images.ImageRule("emu3", 64, 8))
    np.testing.assert_array_equal(out[:h, :w], ref)
    assert (out[h:] == images.EMU3_PAD_VALUE).all() and (out[:, w:] == images.EMU3_PAD_VALUE).all()


def test_crop_rule_and_bad_input():
    image = photo(40, 80)
    out = images.preprocess(image, images.ImageRule("crop", 32))
    want = np.asarray(Image.fromarray(image[:, 20:60]).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="unknown image rule 'stretch'"):
        images.ImageRule("stretch", 32)
    with pytest.raises(ValueError, match=r"RGB uint8 \[H, W, 3\]"):
        images.resize_pad(np.zeros((8, 8), np.uint8), 32)


def test_training_and_inference_use_the_family_rule(tmp_path):
    """A 2:1 understanding image reaches the model padded (the pipeline's patches and the engine's
    pixels agree); its generation target is the centre crop."""
    from unijax.data import pipeline
    from unijax.data.tokenizer import load_tokenizer
    from unijax.models.presets import preset

    cfg = preset("tiny")
    layout = pipeline.Layout.from_model(cfg, 160)
    assert layout.und_image == images.ImageRule("janus", 32, cfg.vision.patch_size)
    assert layout.gen_image.rule == "crop"
    tok = load_tokenizer("shapes", tmp_path)
    image = photo(20, 40)
    x = pipeline.encode_sample({"task": "mmu", "image": image, "turns": [["what is it?", "red"]]}, tok, layout)
    is_img = x["modality"] == 1
    p = layout.und_patch
    got = pipeline.image_patches(images.resize_pad(image, 32), p, layout.patch_dim)
    np.testing.assert_array_equal(x["patches"][is_img], got)
    y = pipeline.encode_sample({"task": "t2i", "image": image, "caption": "a red circle"}, tok, layout)
    got = pipeline.image_patches(images.centre_crop(image, 32), layout.gen_patch, layout.patch_dim)
    np.testing.assert_array_equal(y["patches"][y["modality"] == 2], got)
