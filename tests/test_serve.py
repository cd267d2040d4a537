"""`python -m unijax.serve` on a tiny TA-MoE checkpoint: the API against `unijax.generate`'s engine,
streaming, batching of concurrent requests, routing statistics, bad input, and a bounded load test.
The page in a real browser is `test_serve_browser.py` (slow: it needs Debian's chromium)."""

import base64
import concurrent.futures
import io
import json
import pathlib
import socket
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image
from test_analyze import quick_model

from unijax import checkpoints, serve
from unijax.data import shapes
from unijax.inference.engine import Engine
from unijax.inference.sampling import Sampling
from unijax.models.family import preset

REPO = pathlib.Path(__file__).resolve().parents[1]
QUESTIONS = ["what colour is the circle?", "how many squares are there?", "describe the image.",
             "is there a red circle in the image?", "what shape is the blue object?", "where is the triangle?"]


def ta_moe_cfg():
    return preset("tiny", text={"num_layers": 2}, ffn="ta_moe", moe={"num_experts_per_group": 2, "top_k": 1})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_run(workdir: pathlib.Path, cfg, seed=3) -> pathlib.Path:
    checkpoints.save_model(workdir / "model", quick_model(cfg, seed=seed))
    (workdir / "config.json").write_text(json.dumps({"seed": 5, "data": {"dir": str(REPO / "data")}}))
    return workdir / "model"


SERVE_ARGS = ["--batch_sizes", "1,4", "--lengths", "160", "--max_tokens", "24", "--max_n", "8",
              "--max_image_pixels", "4000000", "--max_request_bytes", str(4 << 20)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, server, ckpt): the app of `python -m unijax.serve` under uvicorn on the loopback."""
    import uvicorn

    ckpt = save_run(tmp_path_factory.mktemp("serve"), ta_moe_cfg())
    app, server = serve.build(serve.parser().parse_args(["--ckpt", str(ckpt), *SERVE_ARGS]))
    port = free_port()
    httpd = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=httpd.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(base + "/health", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.05)
    yield base, server, ckpt
    httpd.should_exit = True
    thread.join(timeout=10)
    server.batcher.stop()


def data_url(image: np.ndarray, fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def scene(i: int) -> np.ndarray:
    return shapes.render(shapes.scene_at(1, i))


def ask(base, image, question, **kw):
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                        {"type": "text", "text": question}]}]
    return requests.post(base + "/v1/chat/completions", json={"messages": msg, **kw}, timeout=120)


def stream_tokens(base, image, question, **kw) -> tuple[list[int], str, list[dict]]:
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                        {"type": "text", "text": question}]}]
    r = requests.post(base + "/v1/chat/completions", json={"messages": msg, "stream": True, **kw}, stream=True, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    tokens, text, events = [], "", []
    for line in r.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: ")
        if line == b"data: [DONE]":
            break
        event = json.loads(line[6:])
        events.append(event)
        if event["object"] == "chat.completion.chunk":
            tokens += [event["token"]] if "token" in event else []
            text += event["choices"][0]["delta"].get("content", "")
    return tokens, text, events


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_answers_and_images_equal_generate(served):
    """Greedy answers equal `Engine.answer` (what `generate --question` prints) and images equal
    `Engine.images` (what `generate --prompt --seed` writes) for the same seed, exactly."""
    base, server, ckpt = served
    engine = Engine.load(ckpt, batch_size=1)
    imgs = [scene(i) for i in range(3)]
    want = engine.answer(imgs, QUESTIONS[:3], max_new_tokens=10)
    got = [ask(base, im, q, max_tokens=10).json()["choices"][0]["message"]["content"] for im, q in zip(imgs, QUESTIONS)]
    assert got == want
    s = Sampling(temperature=1.0, top_k=20)
    want = Engine.load(ckpt, batch_size=4).images(["a red circle and a blue square"], num_images=3, guidance=3.0,
                                                  sampling=s, seed=7)[0]
    r = requests.post(base + "/v1/images/generations", json={"prompt": "a red circle and a blue square", "n": 3,
                                                            "cfg_weight": 3.0, "top_k": 20, "seed": 7}, timeout=120)
    assert r.status_code == 200
    got = np.stack([decode_png(d["b64_json"]) for d in r.json()["data"]])
    np.testing.assert_array_equal(got, want)


def test_no_request_waits_for_a_compile(served):
    """Every program a request reaches was compiled at start-up: one- and two-image questions,
    text-only ones, several batch sizes, images of several prompt lengths and n; the jit caches
    of the decoding programs do not grow."""
    from unijax.inference import decode

    base, _, _ = served
    programs = (decode._prefill_text, decode._step_text, decode._generate_image_codes, decode._decode)
    before = [f._cache_size() for f in programs]
    two = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(scene(0))}}, {"type": "image_url", "image_url": {"url": data_url(scene(1))}},
        {"type": "text", "text": "are they the same?"}]}], "max_tokens": 5}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(requests.post, base + "/v1/chat/completions", json=two, timeout=120),
                   pool.submit(requests.post, base + "/v1/chat/completions", timeout=120,
                               json={"messages": [{"role": "user", "content": "what is a circle?"}], "max_tokens": 3}),
                   pool.submit(ask, base, scene(2), QUESTIONS[1], max_tokens=4),
                   pool.submit(requests.post, base + "/v1/images/generations", timeout=120,
                               json={"prompt": "a red circle " * 12, "n": 3}),
                   pool.submit(requests.post, base + "/v1/images/generations", timeout=120, json={"prompt": "a square"}),
                   pool.submit(requests.post, base + "/v1/images/generations", timeout=120,
                               json={"prompt": "a blue square", "temperature": 0.7, "top_k": 5, "top_p": 0.9})]
        assert [f.result().status_code for f in futures] == [200] * 6, [f.result().text[:200] for f in futures]
    assert [f._cache_size() for f in programs] == before
    # the two-image answer is the engine's for the same question with two marks
    engine = Engine.load(served[2], batch_size=1)
    got = futures[0].result().json()["choices"][0]["message"]["content"]
    assert got == engine.answer([[scene(0), scene(1)]], ["<image>\n<image>\nare they the same?"], max_new_tokens=5)[0]


def test_streaming_gives_the_non_streamed_tokens(served):
    base, _, _ = served
    for i, temperature in ((0, 0.0), (1, 0.8)):
        whole = ask(base, scene(i), QUESTIONS[i], max_tokens=12, temperature=temperature, seed=11).json()
        tokens, text, events = stream_tokens(base, scene(i), QUESTIONS[i], max_tokens=12, temperature=temperature, seed=11)
        assert len(tokens) == whole["usage"]["completion_tokens"]
        assert text.strip() == whole["choices"][0]["message"]["content"]
        assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert events[-2]["usage"] == whole["usage"]
        assert events[-1]["object"] == "unijax.routing"  # the TA-MoE routing of the answer, after it


def test_requests_that_arrive_together_share_a_batch(served):
    """Four concurrent questions decode as one batch (the stats say so) and get the answers they get alone."""
    base, server, _ = served
    alone = [ask(base, scene(i), q, max_tokens=8).json()["choices"][0]["message"]["content"] for i, q in enumerate(QUESTIONS[:4])]
    before = len(server.batcher.batches["chat"])
    gate = threading.Barrier(4)

    def one(i):
        gate.wait()
        return ask(base, scene(i), QUESTIONS[i], max_tokens=8).json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, range(4)))
    assert together == alone
    sizes = server.batcher.batches["chat"][before:]
    assert sum(sizes) == 4 and max(sizes) > 1, sizes


def test_routing_of_a_ta_moe_answer(served):
    """The task router's group shares over an answer's tokens sum to 1 per layer; each group's
    expert loads are the analyze-experts fractions (sum to 1 over the group, or all 0)."""
    base, server, _ = served
    answer = ask(base, scene(2), QUESTIONS[2], max_tokens=6).json()
    routing = answer["unijax"]["routing"]
    assert routing["task"] == "mmu" and len(routing["per_layer"]) == 2
    # counted while decoding: every prompt token and every answer token (EOS aside), once
    assert routing["tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    for layer in routing["per_layer"]:
        assert abs(layer["mmu_group"] + layer["t2i_group"] - 1) < 1e-5
    for load in routing["expert_load"].values():
        assert len(load) == 2 and (abs(sum(load) - 1) < 1e-3 or sum(load) == 0)
    r = requests.post(base + "/v1/images/generations", json={"prompt": "a red circle", "n": 1}, timeout=120).json()
    assert r["unijax"]["routing"]["task"] == "t2i"
    models = requests.get(base + "/v1/models").json()["data"][0]
    assert models["family"] == "janus" and models["ffn"] == "ta_moe" and models["experts"]["per_group"] == 2


def test_bad_input_is_one_line_4xx_and_the_server_keeps_serving(served, tmp_path):
    base, server, _ = served
    chat, gen = base + "/v1/chat/completions", base + "/v1/images/generations"
    # a 50-megapixel PNG (small on the wire): refused from its header, before decoding
    big = io.BytesIO()
    Image.new("RGB", (7100, 7100), (10, 200, 30)).save(big, format="PNG")
    bomb = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()

    def msg(url=None, text="what is it?"):
        parts = [{"type": "text", "text": text}]
        if url:
            parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
        return {"messages": [{"role": "user", "content": parts}]}

    cases = [
        (chat, b'{"messages": [', 400, "not valid JSON"),
        (chat, msg("data:image/png;base64,aGVsbG8gd29ybGQ="), 400, "image_url: not a readable image"),
        (chat, msg("data:image/png;base64,%%%"), 400, "not valid base64"),
        (chat, msg(bomb), 413, "50.4 Mpx is more than the limit of 4.0 Mpx (--max_image_pixels)"),
        (chat, msg("file:///etc/passwd"), 400, "local files are off"),
        (chat, msg("http://example.com/a.png"), 400, "remote URLs are not fetched"),
        (chat, msg(text="  "), 400, "the user message is empty"),
        (chat, {"messages": []}, 400, "messages: empty"),
        (chat, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "expected system, user or assistant"),
        (chat, {**msg(), "max_tokens": 10_000}, 400, "more than --max_tokens=24"),
        (chat, {**msg(text="word " * 200)}, 400, "more than the longest compiled prompt (160) (--lengths)"),
        (chat, {**msg(), "temperature": -1}, 400, "temperature: Input should be greater than or equal to 0"),
        (chat, {**msg(), "top_k": 2**31}, 400, "top_k: Input should be less than 2147483648"),
        (gen, {"prompt": ""}, 400, "prompt: empty"),
        (gen, {"prompt": "a circle", "n": 0}, 400, "n: 0; expected 1 to --max_n=8"),
        (gen, {"prompt": "a circle", "n": 9}, 400, "n: 9; expected 1 to --max_n=8"),
        (gen, b'{"prompt": "a circle", "cfg_weight": NaN}', 400, "cfg_weight: Input should be a finite number"),
        (gen, {"prompt": "a circle", "cfg_weight": -2}, 400, "cfg_weight: -2.0 must be a finite number >= 0"),
        (gen, {"prompt": "x" * (5 << 20)}, 413, "more than --max_request_bytes=4,194,304"),
    ]
    for url, body, status, message in cases:
        t = time.perf_counter()
        if isinstance(body, bytes):
            r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        else:
            r = requests.post(url, json=body, timeout=60)
        assert r.status_code == status, (message, r.text)
        error = r.json()["error"]
        assert message in error["message"] and "\n" not in error["message"], (message, error)
        assert time.perf_counter() - t < 5, message
        assert ask(base, scene(0), QUESTIONS[0], max_tokens=2).status_code == 200
    # local files only under --image_dir (off by default), never outside it
    Image.fromarray(scene(3)).save(tmp_path / "scene.png")
    (tmp_path / "inner").mkdir()
    server.options.image_dir = str(tmp_path / "inner")
    try:
        r = requests.post(chat, json=msg("../scene.png"), timeout=60)
        assert r.status_code == 400 and "'../scene.png' is outside --image_dir" in r.json()["error"]["message"]
        server.options.image_dir = str(tmp_path)
        by_path = requests.post(chat, json={**msg("scene.png"), "max_tokens": 5}, timeout=60).json()
        by_data = requests.post(chat, json={**msg(data_url(scene(3))), "max_tokens": 5}, timeout=60).json()
        assert by_path["choices"] == by_data["choices"]
    finally:
        server.options.image_dir = None
    # a client that leaves mid-stream frees its row; the next requests are served
    msgs = msg(data_url(scene(1)))
    r = requests.post(chat, json={**msgs, "stream": True, "max_tokens": 24}, stream=True, timeout=60)
    next(r.iter_lines())
    r.close()
    assert ask(base, scene(0), QUESTIONS[0], max_tokens=4).status_code == 200
    assert requests.post(gen, json={"prompt": "a circle", "n": 1}, timeout=60).status_code == 200
    assert requests.get(base + "/health").json()["status"] == "ok"


def test_load_of_32_concurrent_clients(served):
    """32 clients, 64 requests mixing questions, streamed questions and image generation: every
    request succeeds and batching is visible (mean rows per decode batch > 1). Throughput is measured
    by bench/serve_load.py, not here."""
    base, server, _ = served
    before = {k: list(v) for k, v in server.batcher.batches.items()}

    def one(i):
        if i % 3 == 2:
            r = requests.post(base + "/v1/images/generations", json={"prompt": f"a red circle {i}", "n": 1 + i % 2,
                                                                    "seed": i}, timeout=300)
            return r.status_code == 200 and len(r.json()["data"]) == 1 + i % 2
        if i % 3 == 1:
            tokens, _, _ = stream_tokens(base, scene(i % 5), QUESTIONS[i % 6], max_tokens=6)
            return 0 < len(tokens) <= 6
        return ask(base, scene(i % 5), QUESTIONS[i % 6], max_tokens=6).status_code == 200

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        ok = list(pool.map(one, range(64)))
    assert all(ok), ok.count(False)
    rows = [n for k, v in server.batcher.batches.items() for n in v[len(before[k]):]]
    assert np.mean(rows) > 1, rows


def test_serving_emu3(tmp_path):
    """The decode thread on the other family: a tiny Emu3 (one decoder and one VQ both ways) gives
    `Engine.answer`'s greedy answer step by step and `Engine.images`' images (the server loads every
    checkpoint kind through `Engine.load`, as `generate` does)."""
    from unijax.serving.batcher import Batcher, ChatJob, ImageJob

    ckpt = save_run(tmp_path / "emu3", preset("tiny", family="emu3", text={"num_layers": 2}))
    engine = Engine.load(ckpt, batch_size=2)
    batcher = Batcher(engine, batch_sizes=(2,), lengths=(128,), max_tokens=16)
    got = []
    job = ChatJob(prompt=engine.mmu_prompt([(QUESTIONS[0], None)], [scene(0)]), max_tokens=6,
                  emit=lambda kind, value: got.append((kind, value)))
    batcher._chat([job])
    assert engine.decode_answer([v for k, v in got if k == "token"]) == engine.answer([scene(0)], [QUESTIONS[0]],
                                                                                     max_new_tokens=6)[0]
    s, out = Sampling(temperature=1.0), []
    batcher._images([ImageJob(ids=engine.tokenizer.t2i_ids("a red circle"), n=2, guidance=3.0, sampling=s, seed=5,
                              emit=lambda kind, value: out.append(value))])
    np.testing.assert_array_equal(out[0]["images"], engine.images(["a red circle"], num_images=2, guidance=3.0, sampling=s,
                                                                   seed=5)[0])
    assert got[-1] in (("done", "length"), ("done", "stop"))
