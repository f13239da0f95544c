"""`unclip studio` driven for real: a server on a free local port (tiny random model, 2 steps)
and Debian's headless Chromium through Playwright.

One test function on purpose: with `pytest -n 2` every test of a module may land on another
worker, and each would start its own server and compile its own samplers.

Needs the `[studio]` extra (Gradio, Playwright's Python driver) and the system Chromium
(`apt-get install chromium`); without them the test fails saying how to get them. It never
downloads a browser. It also writes the README's screenshots, docs/studio_generate.png and
docs/studio_edit.png.
"""
from __future__ import annotations

import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
HOW_TO_GET = ("the studio browser test needs the [studio] extra and Debian's Chromium: "
              "pip install -e '.[test,studio]' && apt-get install -y chromium "
              "(as root; see the README, section `unclip studio`). Never `playwright install`.")
SERVER_START_S = 240
JOB_S = 420  # a run, first compile included, on a busy 2-core machine


def _chromium() -> str:
    for path in CHROMIUM_CANDIDATES:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which("chromium")
    if not found:
        pytest.fail(f"no Chromium found ({', '.join(CHROMIUM_CANDIDATES)}): {HOW_TO_GET}")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _picture(size: int = 192) -> np.ndarray:
    """A test picture (gradient, a disc, a square) with fine noise, so that any resampling or
    re-encoding of the kept pixels shows."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    im = np.stack([255 * x, 255 * y, 255 * (1 - x) * 0.6 + 60], -1)
    pil = Image.fromarray(im.astype(np.uint8))
    d = ImageDraw.Draw(pil)
    d.ellipse([size * 0.12, size * 0.12, size * 0.45, size * 0.45], fill=(250, 210, 40))
    d.rectangle([size * 0.6, size * 0.55, size * 0.88, size * 0.85], fill=(200, 30, 60))
    noise = np.random.default_rng(0).integers(-12, 13, (size, size, 3))
    return np.clip(np.asarray(pil).astype(np.int32) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import gradio  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as e:
        pytest.fail(f"{e}: {HOW_TO_GET}")
    port = _free_port()
    log = tmp_path_factory.mktemp("studio") / "server.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # one CPU device is enough for the server
    cmd = [sys.executable, "-m", "unclip_jax.studio", "--model", "random:tiny", "--port",
           str(port), "--num", "2", "--prior-steps", "2", "--decoder-steps", "2",
           "--sr-steps", "2"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the studio exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > SERVER_START_S:
                pytest.fail(f"the studio did not answer within {SERVER_START_S} s:\n"
                            f"{log.read_text()}")
            time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _mark(what: str, t0=[None]) -> None:
    now = time.time()
    t0[0] = t0[0] or now
    print(f"[studio test] {now - t0[0]:6.1f} s  {what}", flush=True)


def _wait_images(page, selector: str, n: int, timeout: float = JOB_S) -> list:
    """The src of the first ``n`` images under ``selector`` once there are ``n``; fails with
    the page's error message if one shows up."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        toasts = [t for t in page.locator(".toast-body").all_inner_texts() if t.strip()]
        if toasts:
            pytest.fail(f"the page showed an error: {toasts}")
        imgs = page.locator(f"{selector} img")
        if imgs.count() >= n:
            return [imgs.nth(i).get_attribute("src") for i in range(n)]
        time.sleep(0.3)
    pytest.fail(f"no {n} image(s) under {selector} after {timeout} s")


def _wait_toast(page, timeout: float = 30.0) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        toasts = [t for t in page.locator(".toast-body").all_inner_texts() if t.strip()]
        if toasts:
            return " ".join(toasts)
        time.sleep(0.2)
    pytest.fail("no error message appeared in the page")


def _close_toasts(page) -> None:
    for btn in page.locator(".toast-close").all():
        try:
            btn.click(timeout=2000)
        except Exception:  # noqa: BLE001  (already gone)
            pass
    page.wait_for_function("() => document.querySelectorAll('.toast-body').length === 0",
                           timeout=15000)


def _png(page, src: str) -> np.ndarray:
    r = page.request.get(src)
    assert r.ok, f"GET {src} -> {r.status}"
    return np.asarray(Image.open(io.BytesIO(r.body())).convert("RGB"))


def _local_only(context) -> list:
    """Abort every request that leaves this machine (Gradio's page asks a CDN for one script);
    returns the list of what was refused."""
    refused = []

    def route(r):
        if r.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()
    context.route("**/*", route)
    return refused


def test_studio_generate_edit_errors_and_sessions(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, proc, log = server
    exe = _chromium()
    DOCS.mkdir(exist_ok=True)
    picture = _picture()
    pic_path = tmp_path / "picture.png"
    Image.fromarray(picture).save(pic_path)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx_a = browser.new_context(viewport={"width": 1400, "height": 1000})
            _local_only(ctx_a)
            page = ctx_a.new_page()
            page.goto(url)
            page.wait_for_selector("#gen-prompt textarea", timeout=60000)

            _mark("page loaded")
            # ---- Generate: a grid of 2 images
            page.fill("#gen-prompt textarea", "a red heart")
            page.click("#gen-run")
            srcs = _wait_images(page, "#gen-gallery", 2)
            gen = [_png(page, s) for s in srcs]
            assert all(g.shape == (32, 32, 3) for g in gen), [g.shape for g in gen]
            assert page.locator("#gen-files a, #gen-files .file-name").count() >= 1
            page.wait_for_timeout(500)
            page.screenshot(path=str(DOCS / "studio_generate.png"))

            _mark("generated")
            # ---- "send to": the second generated image becomes the Variations input, whose
            # variations then run from it
            page.locator("#gen-gallery img").nth(1).click()
            page.keyboard.press("Escape")
            page.click("#gen-to-vary")
            sent = _wait_images(page, "#vary-image", 1, timeout=60)[0]
            np.testing.assert_array_equal(_png(page, sent), gen[1])
            page.click("#vary-run")
            assert len(_wait_images(page, "#vary-gallery", 2)) == 2
            page.click("button[role=tab]:has-text('Generate')")

            _mark("sent to Variations and varied")
            # ---- bad input: an empty prompt gives a message in the page, no traceback
            page.fill("#gen-prompt textarea", "   ")
            page.click("#gen-run")
            msg = _wait_toast(page)
            assert "prompt is empty" in msg, msg
            assert "Traceback" not in msg
            _close_toasts(page)

            _mark("empty prompt refused")
            # ---- Edit: upload, paint with the brush (mouse drag), describe, inpaint
            page.click("button[role=tab]:has-text('Edit')")
            page.wait_for_selector("#edit-editor button[aria-label=Upload]", timeout=60000)
            with page.expect_file_chooser() as fc:
                page.click("#edit-editor button[aria-label=Upload]")
            fc.value.set_files(str(pic_path))
            page.wait_for_timeout(1500)
            page.click("#edit-editor button[aria-label=Brush]")
            page.wait_for_timeout(300)
            box = page.locator("#edit-editor canvas").first.bounding_box()
            assert box and box["width"] > 50, box
            cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(cx - 40, cy - 10)
            page.mouse.down()
            for i in range(12):
                page.mouse.move(cx - 40 + 7 * i, cy - 10 + 3 * i)
            page.mouse.up()
            page.wait_for_timeout(500)
            page.fill("#edit-prompt textarea", "a yellow star")
            page.click("#edit-run")
            cands = _wait_images(page, "#edit-gallery", 2)
            mask_src = _wait_images(page, "#edit-mask", 1)[0]
            mask = _png(page, mask_src)[:, :, 0] > 127
            assert mask.shape == picture.shape[:2], mask.shape
            assert 0 < mask.mean() < 0.5, f"painted fraction {mask.mean()}"
            for src in cands:
                out = _png(page, src)
                assert out.shape == picture.shape, out.shape
                # every pixel outside the painted region is the input's, bit for bit
                np.testing.assert_array_equal(out[~mask], picture[~mask])
                assert (out[mask] != picture[mask]).any(), "nothing was regenerated"
            page.wait_for_timeout(500)
            page.screenshot(path=str(DOCS / "studio_edit.png"), full_page=True)

            _mark("inpainted")
            # ---- keep editing the selected candidate: the edit stacks in the history
            page.locator("#edit-gallery img").nth(1).click()
            page.keyboard.press("Escape")
            page.click("#edit-keep")
            _wait_images(page, "#edit-history", 2, timeout=60)
            # ... and inpainting it without painting is bad input: a message, not a traceback
            page.wait_for_timeout(1500)
            page.click("#edit-run")
            msg = _wait_toast(page)
            assert "mask is empty" in msg, msg
            _close_toasts(page)

            _mark("empty mask refused")
            # ---- a second browser session sees none of the first one's results
            ctx_b = browser.new_context(viewport={"width": 1400, "height": 1000})
            _local_only(ctx_b)
            page_b = ctx_b.new_page()
            page_b.goto(url)
            page_b.wait_for_selector("#gen-prompt textarea", timeout=60000)
            assert page_b.locator("#gen-gallery img").count() == 0
            assert page_b.locator("#edit-history img").count() == 0
            page_b.fill("#gen-prompt textarea", "a blue circle")
            page_b.fill("#gen-seed input", "7")
            page_b.click("#gen-run")
            b_srcs = _wait_images(page_b, "#gen-gallery", 2)
            assert set(b_srcs).isdisjoint(srcs)  # files are named by content: other images
            _mark("second session generated")
            # the first session still shows its own results; the server is still serving
            page.click("button[role=tab]:has-text('Generate')")
            assert [page.locator("#gen-gallery img").nth(i).get_attribute("src")
                    for i in range(2)] == srcs
            assert proc.poll() is None, log.read_text()
        finally:
            browser.close()
    assert "Traceback" not in log.read_text(), log.read_text()
