"""Screenshot of the inspection page after "mark as normal" (docs/images/operator_loop.png).

    T=../shared/datasets/mvtec_ad/transistor
    spade-ad fit $T --out /tmp/op.spade --image-k 1 --calibrate 0.1
    openssl rand -hex 32 > /tmp/op.token
    python docs/make_operator_screenshot.py /tmp/op.spade /tmp/op.token $T/test/misplaced/003.png \
        docs/images/operator_loop.png

Starts ``spade-ad serve MODEL --admin-token-file TOKEN`` on a free port, opens the page in Debian's
headless Chromium (Playwright), uploads IMAGE, gives the token, presses "mark as normal", uploads IMAGE
again and saves the screenshot. MODEL is changed (the image is added): use a copy.
"""

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

model, token_file, image, out = (Path(a) for a in sys.argv[1:5])
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
base = f"http://127.0.0.1:{port}"
cmd = [sys.executable, "-m", "spade_ad.cli", "serve", str(model), "--port", str(port), "--admin-token-file"]
proc = subprocess.Popen([*cmd, str(token_file), "--log-level", "warning"])
try:
    for _ in range(600):
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(base + "/")
        page.set_input_files("#file", str(image))
        expect(page.locator("body")).to_have_attribute("data-state", "done", timeout=120_000)
        first = page.text_content("#verdict")
        page.fill("#token", token_file.read_text().strip())
        page.click("#token-form button[type=submit]")
        page.click("#mark-normal")
        expect(page.locator("body")).to_have_attribute("data-marked", re.compile(r"\d+"), timeout=120_000)
        marked = page.get_attribute("body", "data-marked")
        page.set_input_files("#file", str(image))
        expect(page.locator("#result-version")).to_have_text(str(marked), timeout=120_000)
        expect(page.locator("body")).to_have_attribute("data-state", "done")
        expect(page.locator("#neighbours img[data-loaded]")).to_have_count(5)
        page.screenshot(path=str(out), full_page=True)
        print(f"{image.name}: {first} before, {page.text_content('#verdict')} after; version {marked}; -> {out}")
        browser.close()
finally:
    proc.terminate()
    proc.wait(30)
