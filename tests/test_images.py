"""Image preprocessing (`unijax.data.images`) against transformers' Janus and Emu3 image processors.

Tolerance: the pixel values after normalisation agree to 1e-6 (float32 rounding of `x / 127.5 - 1`
against the processors' `(x / 255 - 0.5) / 0.5`); both resample with PIL's bicubic on uint8 (the
`JanusImageProcessorPil` backend, which transformers uses without torchvision), so the resized
pixels are identical and the padding geometry is identical.
"""

import pathlib

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

    # Janus-Pro's preprocessor_config.json: 384, mean = std = 0.5, min_size 14, bicubic; RGB conversion
    # on (off, the processor refuses a 4-channel image)
    return JanusImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  min_size=14, resample=3, do_convert_rgb=True)


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
    from unijax.models.family import preset

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


def _file(tmp_path, mode: str, h: int, w: int) -> str:
    """An image file of PIL `mode`: random content with partly transparent regions where the mode
    has transparency, saved as PNG (TIFF for 32-bit modes, JPEG for CMYK)."""
    rng = np.random.default_rng(h * w)
    rgb = photo(h, w, seed=h)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[: h // 3] = 0
    grey = rgb[..., 0]
    if mode == "RGBA":
        im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "LA":
        im = Image.fromarray(np.dstack([grey, alpha]), "LA")
    elif mode in ("P", "P+tRNS"):
        im = Image.fromarray(rgb).quantize(64)
        if mode == "P+tRNS":
            im.info["transparency"] = 3
    elif mode == "L+tRNS":
        im = Image.fromarray(grey, "L")
        im.info["transparency"] = int(grey[0, 0])
    elif mode == "I;16":
        im = Image.fromarray((grey.astype(np.uint16) * 257 // rng.integers(1, 300, (h, w))).astype(np.uint16))
    elif mode in ("I", "F"):
        im = Image.fromarray((grey.astype(np.int32) * 3 - 100).astype(np.int32 if mode == "I" else np.float32))
    elif mode == "1":
        im = Image.fromarray(grey > 128)
    else:  # RGB, L, CMYK
        im = Image.fromarray(rgb).convert(mode)
    ext = {"I": "tiff", "F": "tiff", "CMYK": "jpg"}.get(mode, "png")
    path = tmp_path / f"{mode.replace(';', '').replace('+', '_')}_{h}x{w}.{ext}"
    kw = {"transparency": im.info["transparency"]} if "transparency" in im.info else {}
    im.save(path, **kw)
    with Image.open(path) as back:  # the file holds the mode asked for
        assert back.mode == mode.split("+")[0] and (("transparency" in back.info) == mode.endswith("tRNS"))
    return str(path)


MODES = ["RGB", "RGBA", "LA", "L", "L+tRNS", "P", "P+tRNS", "1", "I;16", "I", "F", "CMYK"]


@pytest.mark.parametrize("mode", MODES)
def test_every_path_reads_every_mode_as_the_janus_processor_does(tmp_path, janus_processor, mode):
    """Training (`records.load_image_file`), evaluation (`benchmarks.load_item_image`) and generation
    (`generate.load_image`) give the same pixels, and after the `janus` rule they equal
    `JanusImageProcessorPil` on the opened file within 1e-6 after normalisation: transparency over
    white, 16 / 32-bit greyscale clipped (transformers' `convert_to_rgb`), odd sizes."""
    from unijax import generate
    from unijax.data import benchmarks, records

    for h, w in [(37, 53), (61, 20)]:
        path = _file(tmp_path, mode, h, w)
        train = records.load_image_file(str(tmp_path), pathlib.Path(path).name, "f.jsonl", 0, "mmu")
        evaluation = benchmarks.load_item_image({"image": path, "id": 0})
        gen = generate.load_image(path)
        np.testing.assert_array_equal(train, evaluation)
        np.testing.assert_array_equal(train, gen)
        with Image.open(path) as im:
            ref = np.asarray(janus_processor(images=[im], return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
        ours = images.preprocess(train, images.ImageRule("janus", 384))
        np.testing.assert_allclose(normalised(ours), ref, atol=1e-6, err_msg=f"{mode} {h}x{w}")


def test_transparent_pixels_are_white_and_16_bit_is_clipped():
    from unijax.data import records

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept; the rest fully transparent black: white
    np.testing.assert_array_equal(records.to_rgb(Image.fromarray(rgba, "RGBA"))[..., 0], [[10, 255], [255, 255]])
    deep = Image.fromarray(np.array([[0, 200, 300, 65535]], np.uint16))
    np.testing.assert_array_equal(records.to_rgb(deep)[0, :, 1], [0, 200, 255, 255])


def test_emu3_rule_equals_emu3_image_processor_sizes_on_every_square_it_can_hold():
    """Every square side 8..2048 on a 512 grid (factor 8): the rule's size is `smart_resize`'s with
    min_pixels = max_pixels = 512^2, except where `smart_resize` returns more than max_pixels. That
    happens at sides 239 and 478 only, where float rounding of `ceil(side * sqrt(512^2 / side^2) / 8)`
    gives 65; a fixed 64 x 64 code grid cannot hold that, and the rule keeps 512."""
    from transformers.models.emu3.image_processing_emu3 import smart_resize

    over = []
    for side in range(8, 2049):
        ref = smart_resize(side, side, factor=8, min_pixels=512 * 512, max_pixels=512 * 512)
        ours = images.emu3_size(side, side, 512, 8)
        if ref[0] * ref[1] > 512 * 512:
            over.append(side)
            assert ours == (512, 512)
        else:
            assert ours == ref, side
    assert over == [239, 478]
