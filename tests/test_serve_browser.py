"""The page of `python -m unijax.serve` in headless Chromium (Debian's `chromium` and
`chromium-driver`, which .ci/run installs): upload an image, ask, see the streamed answer and its
routing, generate two images and find them in the gallery with their download links.

    python tests/test_serve_browser.py http://127.0.0.1:8000 docs/serving.png   # drive a running server
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import envs
import numpy as np
import pytest
import requests
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chrome and driver, "the browser test needs Debian's chromium: apt-get install -y chromium chromium-driver"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.binary_location = chrome
    return webdriver.Chrome(service=Service(driver), options=options)


def drive(base: str, screenshot: pathlib.Path, image: pathlib.Path, question: str = "what colour is the circle?",
          prompt: str = "a red circle above a blue square") -> dict:
    """Uses the page as a person would; returns what it showed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser()
    try:
        wait = WebDriverWait(d, 120)
        d.get(base + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-name").text != "unijax")
        meta = d.find_element(By.ID, "model-meta").text
        d.find_element(By.ID, "file-input").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#thumbs img"))
        d.find_element(By.ID, "question").send_keys(question)
        d.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='1']"))
        answer = d.find_element(By.CSS_SELECTOR, ".message.assistant")
        shown = {"meta": meta, "answer": answer.find_element(By.CSS_SELECTOR, ".text").text,
                 "finish": answer.get_attribute("data-finish"), "tokens": int(answer.get_attribute("data-tokens") or 0),
                 "routing": [e.text for e in answer.find_elements(By.CSS_SELECTOR, ".routing")],
                 "user_images": len(d.find_elements(By.CSS_SELECTOR, ".message.user img"))}
        chat_shot = screenshot.with_name(screenshot.stem + "_chat" + screenshot.suffix)
        d.save_screenshot(str(chat_shot))
        d.find_element(By.ID, "gen-tab").click()
        d.find_element(By.ID, "prompt").send_keys(prompt)
        count = d.find_element(By.ID, "count")
        count.clear()
        count.send_keys("2")
        d.find_element(By.ID, "generate-button").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
        shown["gallery"] = [i.get_attribute("src")[:22] for i in d.find_elements(By.CSS_SELECTOR, "#gallery img")]
        shown["downloads"] = [a.get_attribute("download") for a in d.find_elements(By.CSS_SELECTOR, "#gallery a")]
        shown["status"] = d.find_element(By.ID, "gen-status").text
        d.save_screenshot(str(screenshot))
        return shown
    finally:
        d.quit()


@pytest.mark.slow
def test_page_in_a_browser(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from test_serve import free_port, save_run, ta_moe_cfg

    ckpt = save_run(tmp_path / "run", ta_moe_cfg())
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "unijax.serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--batch_sizes", "1,2", "--lengths", "128", "--max_tokens", "16"],
                            cwd=REPO, env=envs.cli_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not come up in 300 s"
            try:
                if requests.get(base + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        image = tmp_path / "scene.png"
        from unijax.data import shapes

        Image.fromarray(shapes.render(shapes.scene_at(1, 0))).save(image)
        shown = drive(base, tmp_path / "page.png", image)
        api = requests.post(base + "/v1/chat/completions", timeout=60, json={"max_tokens": 16, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                         {"type": "text", "text": "what colour is the circle?"}]}]}).json()
        # the streamed answer as shown equals the API's (greedy), token for token
        assert shown["answer"] == api["choices"][0]["message"]["content"]
        assert shown["tokens"] == api["usage"]["completion_tokens"] > 0
        assert shown["finish"] in ("stop", "length") and shown["user_images"] == 1
        assert shown["routing"] and "task router (mmu tokens): understanding group" in shown["routing"][0]
        assert "family janus" in shown["meta"] and "FFN ta_moe" in shown["meta"] and "experts 2 per group" in shown["meta"]
        assert shown["gallery"] == ["data:image/png;base64,"] * 2 and all(n.endswith(".png") for n in shown["downloads"])
        assert "2 images in" in shown["status"]
        assert "compiling 10/10: done" in (tmp_path / "serve.log").read_text().replace("\r", "\n")
        png = np.asarray(Image.open(tmp_path / "page.png"))
        assert png.shape[0] >= 600 and png.std() > 5  # a rendered page, not a blank one
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _data_url(path: pathlib.Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


if __name__ == "__main__":
    base, out = sys.argv[1], pathlib.Path(sys.argv[2])
    from unijax.data import shapes

    with tempfile.TemporaryDirectory() as tmp:
        image = pathlib.Path(tmp) / "scene.png"
        Image.fromarray(shapes.render(shapes.scene_at(3, int(os.environ.get("SCENE", "4"))))).save(image)
        print(drive(base, out, image, question=os.environ.get("QUESTION", "what colour is the circle?"),
                    prompt=os.environ.get("PROMPT", "a red circle above a blue square")))
