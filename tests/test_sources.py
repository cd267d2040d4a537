"""Raw-sample sources (unijax.data.sources) on tiny on-disk fixtures."""

import json
import os
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from unijax.data.arrayrecord import ArrayRecordSource, convert_to_arrayrecord, write_arrayrecord
from unijax.data.records import BadRecordError, ImageLimits, is_bad, skip_bad
from unijax.data.sources import CaptionSource, LlavaSource


def _img(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def data(tmp_path):
    """Images (RGB, grayscale, RGBA, palette), a LLaVA JSON and a caption JSONL; some records bad."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    imgs = {f"sub/{k}.png": _img(k, 5 + k, 7 + 2 * k) for k in range(4)}
    for rel, a in imgs.items():
        Image.fromarray(a).save(root / rel)
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    Image.fromarray(gray, mode="L").save(root / "gray.png")
    imgs["gray.png"] = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([_img(9, 4, 4), np.full((4, 4, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    white = Image.new("RGBA", (4, 4), (255, 255, 255, 255))  # half-transparent over white, as the processors read it
    imgs["rgba.png"] = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, mode="RGBA")).convert("RGB"))
    pal = Image.fromarray(_img(10, 6, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(root / "pal.png")
    imgs["pal.png"] = np.asarray(pal.convert("RGB"))
    good_png = (root / "sub/0.png").read_bytes()
    (root / "trunc.png").write_bytes(good_png[: len(good_png) // 2])
    (root / "garbage.jpg").write_bytes(b"this is not an image")

    def conv(*msgs):
        return [{"from": f, "value": v} for f, v in msgs]

    llava = [
        {"id": "a", "image": "sub/0.png",
         "conversations": conv(("human", "<image>\nWhat is this?"), ("gpt", "Noise."))},
        {"id": "b", "image": "sub/1.png", "conversations": conv(
            ("human", "Describe it.\n<image>"), ("gpt", "Random pixels."),
            ("human", "Colour?"), ("gpt", "  Many colours.\n"))},
        {"id": "c", "image": "missing.png", "conversations": conv(("human", "<image>\nHi"), ("gpt", "Hello"))},
        {"id": "d", "image": "gray.png", "conversations": conv(("gpt", "I start"), ("human", "<image>\nwrong order"))},
        {"id": "e", "image": "trunc.png", "conversations": conv(("human", "<image>\nA?"), ("gpt", "B."))},
        {"id": "f", "image": "gray.png", "conversations": conv(("human", "Gray? <image>"), ("gpt", "Yes."))},
        {"id": "g", "conversations": conv(("human", "text only"), ("gpt", "no image"))},
        {"id": "h", "conversations": conv(("human", "<image>\nwhere is it?"), ("gpt", "no path"))},
    ]
    llava_path = tmp_path / "llava.json"
    llava_path.write_text(json.dumps(llava))

    caps = [
        {"image": "sub/2.png", "caption": "first caption"},
        {"image": "rgba.png", "caption": "an RGBA image, ünïcödé"},
        None,  # bad JSON line
        {"image": "garbage.jpg", "caption": "not an image"},
        {"image": "pal.png", "caption": "palette"},
        {"image": "sub/3.png", "caption": "last"},
    ]
    lines = ["{not json" if c is None else json.dumps(c, ensure_ascii=False) for c in caps]
    cap_path = tmp_path / "caps.jsonl"
    cap_path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")  # a blank line too
    return dict(root=str(root), imgs=imgs, llava=str(llava_path), caps=str(cap_path), tmp=tmp_path)


LLAVA_GOOD = {
    0: ("sub/0.png", [["What is this?", "Noise."]]),
    1: ("sub/1.png", [["Describe it.", "Random pixels."], ["Colour?", "  Many colours.\n"]]),
    5: ("gray.png", [["Gray?", "Yes."]]),
    6: (None, [["text only", "no image"]]),  # a text-only conversation
}
LLAVA_BAD = {2: "not found under", 3: "starting with human", 4: "cannot be decoded", 7: "mark but no 'image'"}
CAPS_GOOD = {0: ("sub/2.png", "first caption"), 1: ("rgba.png", "an RGBA image, ünïcödé"),
             4: ("pal.png", "palette"), 5: ("sub/3.png", "last")}
CAPS_BAD = {2: "not valid JSON", 3: "cannot be decoded"}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "image" and a[k] is None:
            assert b[k] is None
        elif k == "image":
            assert a[k].dtype == b[k].dtype == np.uint8 and np.array_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_llava_source(data):
    src = LlavaSource(data["llava"], data["root"])
    assert len(src) == 8 and src.task == "mmu"
    for i in [5, 0, 1, -2]:  # any order
        i = i % len(src)
        rel, turns = LLAVA_GOOD[i]
        s = src[i]
        assert set(s) == {"task", "image", "turns", "source", "index"}
        assert s["task"] == "mmu" and s["turns"] == turns and s["source"] == data["llava"] and s["index"] == i
        if rel is None:
            assert s["image"] is None
        else:
            assert s["image"].dtype == np.uint8 and np.array_equal(s["image"], data["imgs"][rel])
    with pytest.raises(IndexError):
        src[8]


def test_caption_source(data):
    src = CaptionSource(data["caps"], data["root"])
    assert len(src) == 6 and src.task == "t2i"  # the blank line is not a record
    for i in [5, 1, 0, 4, 1]:
        rel, cap = CAPS_GOOD[i]
        s = src[i]
        assert set(s) == {"task", "image", "caption", "source", "index"}
        assert (s["task"], s["caption"], s["source"], s["index"]) == ("t2i", cap, data["caps"], i)
        assert s["image"].shape[2] == 3 and np.array_equal(s["image"], data["imgs"][rel])


@pytest.mark.parametrize("kind", ["llava", "caps"])
def test_bad_records(data, kind):
    src = LlavaSource(data["llava"], data["root"]) if kind == "llava" else CaptionSource(data["caps"], data["root"])
    bad, good = (LLAVA_BAD, LLAVA_GOOD) if kind == "llava" else (CAPS_BAD, CAPS_GOOD)
    for i, why in bad.items():
        with pytest.raises(BadRecordError) as e:
            src[i]
        msg = str(e.value)
        assert isinstance(e.value, ValueError)
        assert msg.startswith(f"{data[kind]}: record {i}: ") and why in msg, msg
        assert (e.value.source, e.value.index) == (data[kind], i)
    if kind == "llava":
        with pytest.raises(BadRecordError, match=f"record 2: image 'missing.png' not found under {data['root']}"):
            src[2]

    strict, lenient = skip_bad(src, False), skip_bad(src, True)
    with pytest.raises(BadRecordError):
        strict[next(iter(bad))]
    for i in range(len(src)):
        s = lenient[i]
        if i in bad:
            assert is_bad(s) and s["bad"] is True and s["task"] == src.task
            assert (s["source"], s["index"]) == (data[kind], i) and bad[i] in s["reason"]
        else:
            assert not is_bad(s) and i in good
            _same(s, src[i])
    lenient2 = pickle.loads(pickle.dumps(lenient))
    assert is_bad(lenient2[next(iter(bad))]) and len(lenient2) == len(src)


def test_construction_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        LlavaSource(tmp_path / "nope.json", data["root"])
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="obj.json.*expected a list"):
        LlavaSource(tmp_path / "obj.json", data["root"])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        CaptionSource(tmp_path / "nope.jsonl", data["root"])
    with pytest.raises(FileNotFoundError, match="nope.arrayrecord"):
        ArrayRecordSource([tmp_path / "nope.arrayrecord"])


def test_arrayrecord_round_trip(data, tmp_path):
    caps = skip_bad(CaptionSource(data["caps"], data["root"]), True)
    with pytest.raises(BadRecordError):
        convert_to_arrayrecord(caps.source, tmp_path / "x.arrayrecord")
    assert not os.path.exists(tmp_path / "x.arrayrecord")
    path = str(tmp_path / "caps.arrayrecord")
    assert convert_to_arrayrecord(caps, path, skip_bad_records=True) == len(CAPS_GOOD)
    ar = ArrayRecordSource(path)
    want = [caps[i] for i in sorted(CAPS_GOOD)]
    assert len(ar) == len(want)
    for j in [3, 0, 2, 1]:
        got = ar[j]
        assert (got["source"], got["index"]) == (path, j)
        _same({**got, "source": None, "index": None}, {**want[j], "source": None, "index": None})

    # A mixed MMU + T2I file, two files, and bad records inside an ArrayRecord file.
    llava = LlavaSource(data["llava"], data["root"])
    mixed = str(tmp_path / "mixed.arrayrecord")
    samples = [llava[1], caps[0], llava[5]]
    assert write_arrayrecord(mixed, samples) == 3
    import msgpack
    from array_record.python.array_record_module import ArrayRecordWriter
    bad_path = str(tmp_path / "bad.arrayrecord")
    w = ArrayRecordWriter(bad_path, "group_size:1")
    w.write(msgpack.packb({"task": "t2i", "image": b"garbage", "caption": "x"}))
    w.write(msgpack.packb({"task": "video", "image": b"", "caption": "x"}))
    w.write(b"\xc1")  # invalid msgpack
    w.close()
    both = ArrayRecordSource([mixed, bad_path])
    assert len(both) == 6
    for j, s in enumerate(samples):
        _same({**both[j], "source": 0, "index": 0}, {**s, "source": 0, "index": 0})
        assert (both[j]["source"], both[j]["index"]) == (mixed, j)
    expected = [("cannot be decoded", "t2i"), ("unknown task 'video'", "bad"), ("msgpack", "bad")]
    for j, (why, task) in enumerate(expected):
        with pytest.raises(BadRecordError, match=f"{bad_path}: record {j}: .*{why}"):
            both[3 + j]
        m = skip_bad(both, True)[3 + j]
        assert is_bad(m) and m["task"] == task and m["index"] == j
    with pytest.raises(ValueError, match="marker"):
        write_arrayrecord(str(tmp_path / "m.arrayrecord"), [skip_bad(both, True)[3]])


def _summary(s):
    # Top-level so spawned grain workers can unpickle it.
    text = s.get("caption") or json.dumps(s.get("turns")) or s.get("reason")
    img = s.get("image")
    pixels = None if img is None else (img.shape, int(img.astype(np.int64).sum()))
    return (s["task"], s["index"], is_bad(s), text, pixels)


def test_grain_single_and_multiprocess(data, tmp_path):
    llava = skip_bad(LlavaSource(data["llava"], data["root"]), True)
    caps = skip_bad(CaptionSource(data["caps"], data["root"]), True)
    ar_path = str(tmp_path / "all.arrayrecord")
    convert_to_arrayrecord(grain.MapDataset.concatenate([
        grain.MapDataset.source(llava), grain.MapDataset.source(caps)]), ar_path, skip_bad_records=True)
    ar = ArrayRecordSource(ar_path)
    ds = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in (llava, caps, ar)]).map(_summary)
    single = list(ds)
    assert len(single) == 8 + 6 + 8
    assert [x[2] for x in single[:14]] == [i in LLAVA_BAD for i in range(8)] + [i in CAPS_BAD for i in range(6)]
    good = [(t, tx, im) for (t, _, b, tx, im) in single[:14] if not b]
    assert [(t, tx, im) for (t, _, _, tx, im) in single[14:]] == good
    from absl import flags  # grain's multiprocessing reads absl flags; pytest never parses them
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    multi = list(ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    assert multi == single


def test_jsonl_conversations_and_parquet_captions(data, tmp_path):
    """The same records read from a .jsonl conversation file and from parquet caption files whose
    image column holds bytes, paths, or datasets' {"bytes", "path"} struct (several row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unijax.data.sources import ParquetCaptionSource, open_source

    records = json.loads(open(data["llava"]).read())
    jsonl = tmp_path / "llava.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    a, b = LlavaSource(data["llava"], data["root"]), open_source(str(jsonl), data["root"], "mmu")
    assert isinstance(b, LlavaSource) and len(a) == len(b) == 8
    for i in LLAVA_GOOD:
        _same({**a[i], "source": 0}, {**b[i], "source": 0})
    with pytest.raises(BadRecordError, match="llava.jsonl: record 7: .*mark but no 'image'"):
        b[7]
    root = data["root"]
    good = [CAPS_GOOD[i] for i in sorted(CAPS_GOOD)]
    columns = {
        "bytes": [open(os.path.join(root, rel), "rb").read() for rel, _ in good],
        "path": [rel for rel, _ in good],
        "struct": [{"bytes": open(os.path.join(root, rel), "rb").read(), "path": rel} for rel, _ in good],
    }
    for kind, images in columns.items():
        path = tmp_path / f"caps_{kind}.parquet"
        pq.write_table(pa.table({"image": images, "caption": [c for _, c in good]}), path, row_group_size=3)
        src = open_source(str(path), root, "t2i")
        assert isinstance(src, ParquetCaptionSource) and len(src) == len(good)
        src = pickle.loads(pickle.dumps(src))
        for j in [3, 0, 2, 1]:
            s = src[j]
            assert (s["task"], s["caption"], s["source"], s["index"]) == ("t2i", good[j][1], str(path), j)
            assert np.array_equal(s["image"], data["imgs"][good[j][0]])
    pq.write_table(pa.table({"image": ["missing.png"], "caption": [None]}), tmp_path / "bad.parquet")
    with pytest.raises(BadRecordError, match="bad.parquet: record 0: 'caption' must be a string"):
        open_source(str(tmp_path / "bad.parquet"), root, "t2i")[0]
    pq.write_table(pa.table({"img": [b""], "caption": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match="cols.parquet: no column 'image'"):
        ParquetCaptionSource(tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match="caption files are .jsonl or .parquet"):
        open_source(data["llava"], root, "t2i")


def test_pack_keeps_original_bytes_counts_and_resumes(data, tmp_path):
    """`unijax.pack`: per-task shards of `records_per_shard` inputs with the images' original bytes
    (a JPEG stays the same JPEG), bad records skipped and counted per shard in index.json, a rerun
    writes only the shards that are missing, other inputs need --overwrite; the shards train."""
    import msgpack
    from array_record.python.array_record_module import ArrayRecordReader

    from unijax import pack as pack_cli
    from unijax.data import datasets
    from unijax.data.arrayrecord import PACK_INDEX

    jpeg = tmp_path / "images" / "photo.jpg"
    Image.fromarray(_img(3, 20, 30)).save(jpeg, quality=80)
    caps = tmp_path / "more.jsonl"
    caps.write_text(json.dumps({"image": "photo.jpg", "caption": "a jpeg"}) + "\n")
    out = tmp_path / "packed"
    argv = ["--mmu", data["llava"], "--mmu_image_root", data["root"], "--t2i", f"{data['caps']},{caps}",
            "--t2i_image_root", data["root"], "--out", str(out), "--records_per_shard", "3"]
    index = pack_cli.main(argv)
    shards = index["shards"]
    assert sorted(shards) == ["mmu-00000-of-00003.arrayrecord", "mmu-00001-of-00003.arrayrecord",
                              "mmu-00002-of-00003.arrayrecord", "t2i-00000-of-00003.arrayrecord",
                              "t2i-00001-of-00003.arrayrecord", "t2i-00002-of-00003.arrayrecord"]
    assert sum(v["records"] for k, v in shards.items() if k.startswith("mmu")) == len(LLAVA_GOOD)
    assert sum(v["skipped"] for k, v in shards.items() if k.startswith("mmu")) == len(LLAVA_BAD)
    assert sum(v["records"] for k, v in shards.items() if k.startswith("t2i")) == len(CAPS_GOOD) + 1
    reader = ArrayRecordReader(str(out / "t2i-00002-of-00003.arrayrecord"))
    last = msgpack.unpackb(reader.read_all()[-1], raw=False)
    reader.close()
    assert last["caption"] == "a jpeg" and last["image"] == jpeg.read_bytes()  # the original JPEG bytes
    ar = ArrayRecordSource(sorted(str(p) for p in out.glob("mmu-*.arrayrecord")))
    text_only = [ar[i] for i in range(len(ar)) if ar[i]["image"] is None]
    assert len(ar) == len(LLAVA_GOOD) and [s["turns"] for s in text_only] == [LLAVA_GOOD[6][1]]

    # resume: a missing shard (and its index entry) is written again, the others are not touched
    (out / "mmu-00001-of-00003.arrayrecord").unlink()
    idx = json.loads((out / PACK_INDEX).read_text())
    del idx["shards"]["mmu-00001-of-00003.arrayrecord"]
    (out / PACK_INDEX).write_text(json.dumps(idx))
    before = (out / "t2i-00000-of-00003.arrayrecord").stat().st_mtime_ns
    assert pack_cli.main(argv)["shards"] == shards
    assert (out / "t2i-00000-of-00003.arrayrecord").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="other inputs or another shard size"):
        pack_cli.main(argv[:-1] + ["4"])
    # resume is by content: a touched file resumes, the same size with other bytes does not
    os.utime(caps, (1, 1))
    assert pack_cli.main(argv)["shards"] == shards
    caps.write_text(caps.read_text().replace("a jpeg", "b jpeg"))
    with pytest.raises(ValueError, match="other inputs or another shard size"):
        pack_cli.main(argv)
    caps.write_text(caps.read_text().replace("b jpeg", "a jpeg"))
    # every skipped record once, with its reason, in skipped.jsonl; a summary by reason
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows if r["split"] == "mmu") == sorted(LLAVA_BAD)
    assert all(r["reason"] for r in rows) and len(rows) == len(LLAVA_BAD) + len(CAPS_BAD)
    assert index["skipped_summary"][0].startswith(f"skipped {len(LLAVA_BAD)} mmu records: ")

    cfg = __import__("configs.base", fromlist=["x"]).get_config()
    cfg.data.update(source="files", mmu_arrayrecord=str(out / "mmu-*.arrayrecord"),
                    t2i_arrayrecord=str(out / "t2i-*.arrayrecord"))
    dsets, _ = datasets.task_datasets(cfg.data, 32, 0)
    assert dsets[1][0]["task"] == "t2i" and dsets[0][0]["task"] == "mmu"


def _png_header(width: int, height: int) -> bytes:
    """A PNG of `width x height` (8-bit RGB) as far as its header goes: 37 bytes, no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_hostile_image_files_are_bad_records_without_reading_or_decoding(tmp_path):
    """A FIFO (would block forever), a symlink to /dev/zero (endless), a path leaving the image root,
    a 144 Mpx PNG of 37 bytes (refused from its header) and a file over the byte limit: each a bad
    record naming its reason and the key that changes it, in well under a second each."""
    import time

    from unijax import generate
    from unijax.data.records import load_image_file

    root = tmp_path / "images"
    root.mkdir()
    os.mkfifo(root / "fifo.png")
    os.symlink("/dev/zero", root / "zero.png")
    (root / "huge.png").write_bytes(_png_header(12000, 12000))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "ok.png")
    (tmp_path / "secret.png").write_bytes((root / "ok.png").read_bytes())
    allow = ImageLimits(allow_outside_root=True)
    cases = [("fifo.png", ImageLimits(), "not a regular file"),
             ("zero.png", ImageLimits(), "outside the image root"),
             ("zero.png", allow, "not a regular file"),
             ("../secret.png", ImageLimits(), "data.allow_outside_image_root=True"),
             ("huge.png", ImageLimits(), "144.0 Mpx is more than the limit of 40.0 Mpx (data.max_image_pixels)"),
             ("ok.png", ImageLimits(max_bytes=50), "larger than 50 bytes (data.max_image_bytes)")]
    for rel, limits, message in cases:
        t = time.perf_counter()
        with pytest.raises(BadRecordError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_image_file(str(root), rel, "f.jsonl", 3, "t2i", limits=limits)
        assert time.perf_counter() - t < 1.0, rel
    assert load_image_file(str(root), "../secret.png", "f.jsonl", 3, "t2i", limits=allow).shape == (8, 8, 3)
    # generate --image: one line, no traceback, for a bomb or a FIFO
    for name in ("huge.png", "fifo.png"):
        with pytest.raises(ValueError, match=f"--image {root / name}: not a readable image"):
            generate.load_image(root / name)


def test_deeply_nested_and_oversized_json_records_are_bad_records(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "ok.png")
    ok = json.dumps({"image": "ok.png", "caption": "fine"})
    lines = [ok, "[" * 100_000 + "]" * 100_000, json.dumps({"image": "ok.png", "caption": "x" * (2 << 20)}), ok]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    src = CaptionSource(tmp_path / "caps.jsonl", root)
    assert src[0]["caption"] == src[3]["caption"] == "fine"
    with pytest.raises(BadRecordError, match="record 1: JSON nested too deeply to parse"):
        src[1]
    with pytest.raises(BadRecordError, match="record 2: record is 2,097,1.. bytes, more than 1,048,576"):
        src[2]
    (tmp_path / "deep.json").write_text("[" + lines[1] + "]")
    with pytest.raises(ValueError, match="deep.json: JSON nested too deeply"):
        LlavaSource(tmp_path / "deep.json", root)


def test_oversized_arrayrecord_records_are_bad_records(tmp_path):
    """An ArrayRecord record's text is bounded like a JSON record's (1 MiB besides its images, which
    data.max_image_bytes bounds), and a record names at most 64 images; the records around it read."""
    import io

    import msgpack
    from array_record.python.array_record_module import ArrayRecordWriter

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    path = str(tmp_path / "hostile.arrayrecord")
    w = ArrayRecordWriter(path, "group_size:1")
    w.write(msgpack.packb({"task": "t2i", "image": png, "caption": "fine"}))
    w.write(msgpack.packb({"task": "mmu", "image": png, "turns": [["what?", "x" * (2 << 20)]]}))
    w.write(msgpack.packb({"task": "mmu", "images": [png] * 65, "turns": [["<image>" * 65 + "?", "no"]]}))
    w.write(msgpack.packb({"task": "t2i", "image": b"\x89PNG" + b"\0" * (2 << 20), "caption": "big image, small text"}))
    w.close()
    src = ArrayRecordSource(path, limits=ImageLimits(max_bytes=1 << 20))
    assert src[0]["caption"] == "fine"
    with pytest.raises(BadRecordError, match=r"record 1: record holds 2,097,1.. bytes besides its images, more than 1,048,576"):
        src[1]
    with pytest.raises(BadRecordError, match="record 2: 65 images, more than 64 a record may hold"):
        src[2]
    with pytest.raises(BadRecordError, match=r"record 3: image bytes larger than 1,048,576 \(data.max_image_bytes\)"):
        src[3]
