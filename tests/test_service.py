"""The HTTP scoring service (``spade-ad serve``): real HTTP on loopback against started server processes,
the inspection page in headless Chromium, every refused upload, the queue limit, timeouts, micro-batching
and a property-based run of the OpenAPI schema.

One model is fitted on 12 real transistor training images (3 held out to calibrate thresholds) and
served by ``python -m spade_ad.cli serve`` for the whole module.
"""

from __future__ import annotations

import base64
import concurrent.futures
import csv
import io
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image

from spade_ad import SPADE, __version__
from spade_ad.data import read_image, read_image_bytes
from spade_ad.datasets import sample_path
from spade_ad.errors import ImageError, ImageTooLargeError
from spade_ad.service import MicroBatcher, QueueFull, ServiceSettings, create_app
from spade_ad.service.uploads import display_name
from spade_ad.thresholds import Thresholds

# The bundled sample (a subset of MVTec AD transistor), so that the service is tested on a fresh clone too.
TRANSISTOR = sample_path() / "transistor"
CHROMIUM = Path("/usr/bin/chromium")
MAX_UPLOAD = 500_000  # bytes; the transistor PNGs are about 76 kB
MAX_PIXELS = 1_000_000  # the transistor images have 65,536
MAX_BATCH_IMAGES = 4
BENT = TRANSISTOR / "test" / "bent_lead" / "000.png"
TEST_IMAGES = [BENT, TRANSISTOR / "test" / "good" / "000.png", TRANSISTOR / "test" / "damaged_case" / "002.png"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two cores shared with other work: keep servers on one thread
#: SPADE_AD_TEST_RUNTIME=openvino (or onnxruntime) runs these same tests with the servers, the CLI and the
#: in-process reference models all on that backbone runtime; unset, the model's own (torch).
RUNTIME = os.environ.get("SPADE_AD_TEST_RUNTIME") or None
RUNTIME_ARGS = ["--runtime", RUNTIME] if RUNTIME else []


# ------------------------------------------------------------------------------------------------
# fixtures: a model on real data, a started server process
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    train = sorted((TRANSISTOR / "train" / "good").glob("*.png"))[:12]
    with pytest.warns(UserWarning, match="training images for k=50"):
        model = SPADE().fit([str(p) for p in train], calibrate=0.25)
    assert model.thresholds_ is not None and model.thresholds_.pixel is not None
    return model.save(tmp_path_factory.mktemp("model") / "transistor.spade")


@pytest.fixture(scope="module")
def model(model_file: Path) -> SPADE:
    """The same model, loaded in the test process, to compare the service's answers with."""
    return SPADE.load(model_file, runtime=RUNTIME)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base: str
    proc: subprocess.Popen | None
    log: Path | None

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.base + path, timeout=60, **kw)

    def log_text(self) -> str:
        return self.log.read_text() if self.log is not None and self.log.exists() else ""


def _wait_ready(server: Server, deadline_s: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if server.proc is not None and server.proc.poll() is not None:
            pytest.fail(f"server exited with code {server.proc.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(server.base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready after {deadline_s:.0f} s:\n{server.log_text()}")


@contextmanager
def _serve_process(model_file: Path, folder: Path, *options: str) -> Iterator[Server]:
    """``python -m spade_ad.cli serve MODEL --port P ...`` as a child process, until /readyz says ready."""
    port = _free_port()
    log = folder / f"server_{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "spade_ad.cli",
        "serve",
        str(model_file),
        "--port",
        str(port),
        "--torch-threads",
        "1",
        "--log-level",
        "warning",
        *RUNTIME_ARGS,
        *options,
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _serve_in_thread(app: FastAPI) -> Iterator[Server]:
    """The app under uvicorn in a thread of this process (still real HTTP on loopback): for tests that
    need to reach into the model (slow it down) or read its batching counters."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    s = Server(f"http://127.0.0.1:{port}", None, None)
    try:
        _wait_ready(s, 60)
        yield s
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def server(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _serve_process(
        model_file,
        tmp_path_factory.mktemp("server"),
        "--max-upload-bytes",
        str(MAX_UPLOAD),
        "--max-pixels",
        str(MAX_PIXELS),
        "--max-batch-images",
        str(MAX_BATCH_IMAGES),
        "--queue-size",
        "16",
    ) as s:
        yield s


def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _score(server: Server, path: Path, query: str = "") -> dict:
    r = server.post(f"/v1/score{query}", files={"file": (path.name, _png_bytes(path), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def _decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ------------------------------------------------------------------------------------------------
# health, model information, the same scores as spade-ad predict
# ------------------------------------------------------------------------------------------------
def test_health_ready_and_model_info(server: Server, model: SPADE):
    assert server.get("/healthz").json()["status"] == "alive"
    assert server.get("/readyz").json()["status"] == "ready"
    info = server.get("/v1/model").json()
    cfg = model.get_config()
    for key in ("backbone", "k", "kappa", "levels", "sigma", "thresholds", "n_train"):
        assert info[key] == cfg[key], key
    assert info["n_train"] == 9 and info["package_version"] == __version__
    assert info["thresholds"]["image"] == model.thresholds_.image
    svc = info["service"]
    assert (svc["max_upload_bytes"], svc["max_pixels"], svc["max_batch_images"], svc["queue_size"]) == (
        MAX_UPLOAD,
        MAX_PIXELS,
        MAX_BATCH_IMAGES,
        16,
    )
    schema = server.get("/openapi.json").json()
    assert {"/v1/score", "/v1/score/batch", "/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    # No CDN-backed interactive docs: the service makes no request to the outside.
    assert server.get("/docs").status_code == 404


def test_loopback_is_the_default_address():
    from spade_ad.cli import serve

    host = next(p for p in serve.params if p.name == "host")
    assert host.default == "127.0.0.1"


def _csv_matches(value: float, written: str) -> bool:
    """``spade-ad predict`` writes 6 significant digits: the service's full value must round to them."""
    ref = float(written)
    half_unit = 0.5 * 10 ** (math.floor(math.log10(abs(ref))) - 5)
    return abs(value - ref) <= half_unit * (1 + 1e-9)


def test_score_matches_cli_predict(server: Server, model: SPADE, model_file: Path, tmp_path: Path):
    out = tmp_path / "pred"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "spade_ad.cli",
            "predict",
            str(model_file),
            *map(str, TEST_IMAGES),
            "--out",
            str(out),
            "--no-overlays",
            *RUNTIME_ARGS,
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    with open(out / "scores.csv", newline="") as f:
        rows = {Path(row["path"]).resolve(): row for row in csv.DictReader(f)}
    expected = model.predict([str(p) for p in TEST_IMAGES])
    flagged = 0
    for i, path in enumerate(TEST_IMAGES):
        multipart = _score(server, path)
        raw = server.post(
            "/v1/score", content=_png_bytes(path), headers={"Content-Type": "image/png", "X-Filename": path.name}
        ).json()
        row = rows[path.resolve()]
        for res in (multipart, raw):
            assert _csv_matches(res["image_score"], row["image_score"]), (res["image_score"], row["image_score"])
            assert _rel(res["image_score"], float(expected.image_scores[i])) <= 1e-6
            assert res["is_anomalous"] == bool(int(row["is_anomalous"])) == bool(expected.is_anomalous[i])
            assert res["threshold"] == model.thresholds_.image and res["name"] == path.name
            assert [n["index"] for n in res["neighbours"]] == expected.neighbors[i][:5].tolist()
            assert [n["path"] for n in res["neighbours"]] == [model.train_paths_[j] for j in expected.neighbors[i][:5]]
            # Squared global distances, as predict gives them (no explain needed).
            for n, d in zip(res["neighbours"], expected.neighbor_sq_distances[i][:5], strict=True):
                assert _rel(n["distance"], float(d)) <= 1e-6
            assert abs(res["map_max"] - float(expected.anomaly_maps[i].max())) <= 1e-6 * res["map_max"]
            assert 0 < res["seconds"] < 60
        flagged += multipart["is_anomalous"]
    assert flagged >= 1  # the bent lead is flagged, so the comparison covers both outcomes' fields


def test_explain_gives_squared_distances_and_correspondence(server: Server, model: SPADE):
    res = _score(server, BENT, "?explain=true&neighbours=3")
    e = model.explain([str(BENT)])[0]
    assert [n["index"] for n in res["neighbours"]] == e.neighbors[:3].tolist()
    for n, d in zip(res["neighbours"], e.neighbor_sq_distances[:3], strict=True):
        assert _rel(n["distance"], float(d)) <= 1e-6
    # The kNN image score is the mean of these squared distances over the k (= all 9) nearest.
    all9 = _score(server, BENT, "?explain=true&neighbours=50")
    assert len(all9["neighbours"]) == 9
    assert _rel(np.mean([n["distance"] for n in all9["neighbours"]]), res["image_score"]) <= 1e-5
    rebuilt = _decode_png(res["correspondence_png"])
    assert rebuilt.shape == (224, 224, 3) and rebuilt.std() > 5  # a picture, not a blank


def test_map_pictures_overlay_outline_and_scale(server: Server, model: SPADE):
    res = _score(server, BENT, "?map=true")
    amap = model.predict([str(BENT)]).anomaly_maps[0]
    pixel_th = model.thresholds_.pixel
    assert res["pixel_threshold"] == pixel_th and res["map_range"] == [0.0, 2 * pixel_th]
    overlay, grey, outline = (_decode_png(res[k]) for k in ("overlay_png", "anomaly_map_png", "outline_png"))
    assert overlay.shape == (224, 224, 3) and grey.shape == (224, 224) and outline.shape == (224, 224, 4)
    # The grey map is the anomaly map on the reported scale.
    expect = np.clip(amap / (2 * pixel_th), 0, 1) * 255
    assert np.abs(grey.astype(float) - expect).max() <= 1.0
    # The outline is drawn on the boundary of the pixels at or above the pixel threshold, nowhere else.
    mask = amap >= pixel_th
    assert mask.any(), "the bent lead should cross the pixel threshold"
    drawn = outline[:, :, 3] > 0
    assert drawn.any() and not (drawn & ~mask).any()
    assert res["anomalous_pixel_fraction"] == pytest.approx(mask.mean())
    # Without map=true there are no pictures at all.
    plain = _score(server, BENT)
    assert plain["overlay_png"] is None and plain["anomaly_map_png"] is None and plain["map_range"] is None


def test_batch_endpoint_matches_single_requests(server: Server):
    files = [("files", (p.name, _png_bytes(p), "image/png")) for p in TEST_IMAGES]
    r = server.post("/v1/score/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == [p.name for p in TEST_IMAGES]
    for res, path in zip(results, TEST_IMAGES, strict=True):
        assert _rel(res["image_score"], _score(server, path)["image_score"]) <= 1e-6


def test_train_image_endpoint(server: Server, model: SPADE):
    r = server.get("/v1/train/2.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    expected = (np.clip(model.train_image(2).transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(img, expected)
    assert server.get("/v1/train/9.png").status_code == 404
    assert "0..8" in server.get("/v1/train/9.png").json()["detail"]


# ------------------------------------------------------------------------------------------------
# refused uploads: each gets its 4xx and a message naming the upload; the server keeps serving
# ------------------------------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height with a few bytes of pixel data: a decompression bomb's header
    (decoding it would need width*height bytes; the size must be refused before any decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "GIF")
    return buf.getvalue()


def test_bad_uploads_get_their_4xx_and_server_keeps_serving(server: Server):
    good = _png_bytes(BENT)
    big_png = io.BytesIO()
    Image.new("L", (1200, 1000), 0).save(big_png, "PNG")  # 1.2 Mpx but only ~1 kB: over the pixel limit
    cases = [
        # (what, request kwargs, status, words the message must contain)
        (
            "multipart file over the byte limit",
            {"files": {"file": ("huge.png", b"\0" * (MAX_UPLOAD + 1), "image/png")}},
            413,
            ["huge.png", "exceeds the upload limit"],
        ),
        (
            "raw body over the byte limit",
            {"content": b"\0" * (3 * MAX_UPLOAD), "headers": {"Content-Type": "image/png"}},
            413,
            ["exceeds the limit"],
        ),
        (
            "decompression-bomb header",
            {"files": {"file": ("bomb.png", _png_header_only(100_000, 100_000), "image/png")}},
            413,
            ["bomb.png", "10,000,000,000 pixels exceeds the limit"],
        ),
        (
            "real image over the pixel limit",
            {"files": {"file": ("wide.png", big_png.getvalue(), "image/png")}},
            413,
            ["wide.png", "1,200,000 pixels"],
        ),
        (
            "truncated PNG",
            {"files": {"file": ("cut.png", good[: len(good) // 2], "image/png")}},
            422,
            ["cut.png", "truncated or corrupt"],
        ),
        (
            "not an image",
            {"files": {"file": ("notes.png", b"just some text", "image/png")}},
            422,
            ["notes.png", "not an image"],
        ),
        ("empty file", {"files": {"file": ("empty.png", b"", "image/png")}}, 422, ["empty.png", "empty file"]),
        (
            "decodable but refused format (GIF) sent as octet-stream",
            {"files": {"file": ("anim.gif", _gif_bytes(), "application/octet-stream")}},
            422,
            ["anim.gif", "accepted: PNG, JPEG"],
        ),
        (
            "part declared with a non-image content type",
            {"files": {"file": ("a.txt", good, "text/plain")}},
            415,
            ["a.txt", "unsupported content type 'text/plain'"],
        ),
        (
            "raw body with a non-image content type",
            {"content": good, "headers": {"Content-Type": "text/plain"}},
            415,
            ["unsupported content type 'text/plain'"],
        ),
        (
            "raw body of an unsupported image type",
            {"content": _gif_bytes(), "headers": {"Content-Type": "image/gif"}},
            415,
            ["'image/gif'"],
        ),
        ("JSON instead of an image", {"json": {"image": "x"}}, 415, ["application/json"]),
        (
            "multipart without a file",
            {"data": {"note": "hello"}, "files": {"other": ("x", b"", "text/plain")}},
            422,
            ["no file", "'file'"],
        ),
        (
            "two files to the single-image endpoint",
            {"files": [("file", ("a.png", good, "image/png")), ("file", ("b.png", good, "image/png"))]},
            422,
            ["/v1/score/batch"],
        ),
        (
            "path-like file name is only a label",
            {"files": {"file": ("../../etc/passwd", b"root:x:0:0", "image/png")}},
            422,
            ["passwd: not an image"],
        ),
        (
            "invalid query parameter",
            {"files": {"file": ("a.png", good, "image/png")}, "params": {"neighbours": -1}},
            422,
            ["neighbours"],
        ),
    ]
    for what, kwargs, status, words in cases:
        r = server.post("/v1/score", **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text)
        detail = r.json()["detail"]
        for w in words:
            assert w in detail, (what, detail)
        assert "../" not in detail and "/etc" not in detail, (what, detail)
        assert server.get("/healthz").status_code == 200, what
    too_many = [("files", (f"{i}.png", good, "image/png")) for i in range(MAX_BATCH_IMAGES + 1)]
    r = server.post("/v1/score/batch", files=too_many)
    assert r.status_code == 413 and f"the limit is {MAX_BATCH_IMAGES}" in r.json()["detail"]
    # A batch with one bad image is refused as a whole, naming it.
    r = server.post(
        "/v1/score/batch",
        files=[("files", ("ok.png", good, "image/png")), ("files", ("bad.png", b"nope", "image/png"))],
    )
    assert r.status_code == 422 and r.json()["detail"].startswith("bad.png: not an image")
    # Still serving real work, and nothing is left admitted.
    assert _score(server, BENT)["name"] == BENT.name
    assert server.get("/v1/stats").json()["admitted_now"] == 0


def test_display_names_are_labels_not_paths():
    assert display_name("../../etc/passwd") == "passwd"
    assert display_name("C:\\x\\y.png") == "y.png"
    assert display_name("a\x00b\nc.png") == "abc.png"
    assert display_name("") == display_name(None) == "upload"
    assert len(display_name("x" * 500)) == 100


# ------------------------------------------------------------------------------------------------
# property-based run of the OpenAPI schema
# ------------------------------------------------------------------------------------------------
def test_openapi_schema_property_based_no_server_errors(server: Server, tmp_path: Path):
    # Every check except positive_data_acceptance: the schema can only say "binary" for an image, and
    # random bytes that satisfy it are rightly refused (422), which that check would count as a failure.
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.base}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        "8",
        "--seed",
        "7",
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "60",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "No issues found" in r.stdout and "Tested: 7" in r.stdout, r.stdout[-3000:]
    assert server.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------------------
# the inspection page in headless Chromium
# ------------------------------------------------------------------------------------------------
def test_page_in_headless_chromium(server: Server, model: SPADE):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run scripts/install_browser.sh (Debian package 'chromium')")
    from playwright.sync_api import expect, sync_playwright

    api = _score(server, BENT, "?map=true")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            # The page's own Content-Security-Policy stays on: it must work under it.
            page = browser.new_page()
            urls: list[str] = []
            page.on("request", lambda req: urls.append(req.url))
            page.goto(server.base + "/")
            expect(page.locator("#model")).to_contain_text("9 training images, image threshold")

            # Choose a file: score, verdict, overlay, outline, correspondence and neighbours appear.
            page.set_input_files("#file", str(BENT))
            expect(page.locator("body")).to_have_attribute("data-state", "done", timeout=60_000)
            for sel in ("#overlay", "#outline", "#correspondence"):
                expect(page.locator(f"{sel}[data-loaded]")).to_be_visible()
                assert page.eval_on_selector(sel, "e => e.naturalWidth") == 224, sel
            assert float(page.text_content("#score")) == pytest.approx(api["image_score"], rel=1e-5)
            assert page.text_content("#verdict") == ("ANOMALOUS" if api["is_anomalous"] else "normal")
            assert page.text_content("#name") == BENT.name
            expect(page.locator("#neighbours img[data-loaded]")).to_have_count(5)
            assert page.eval_on_selector_all("#neighbours img", "els => els.map(e => e.naturalWidth)") == [224] * 5
            assert "squared distance" in page.text_content("#neighbours li")
            page.uncheck("#show-outline")
            expect(page.locator("#outline")).to_be_hidden()

            # Drop another image onto the drop zone.
            good = TEST_IMAGES[1]
            drop_js = """async ([b64, name, type]) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], name, {type}));
                document.getElementById('drop').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
            }"""
            page.evaluate(drop_js, [base64.b64encode(good.read_bytes()).decode(), "dropped.png", "image/png"])
            expect(page.locator("#name")).to_have_text("dropped.png", timeout=60_000)
            expect(page.locator("body")).to_have_attribute("data-state", "done")
            assert float(page.text_content("#score")) == pytest.approx(_score(server, good)["image_score"], rel=1e-5)

            # Refused uploads show the server's message.
            page.evaluate(drop_js, [base64.b64encode(b"not a picture").decode(), "notes.png", "image/png"])
            expect(page.locator("#error")).to_contain_text("422", timeout=60_000)
            expect(page.locator("#error")).to_contain_text("notes.png: not an image")
            page.set_input_files(
                "#file", {"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * (MAX_UPLOAD + 10)}
            )
            expect(page.locator("#error")).to_contain_text("413", timeout=60_000)
            expect(page.locator("#error")).to_contain_text("huge.png")

            # Nothing was fetched from anywhere but this server.
            assert urls and all(u.startswith((server.base + "/", "data:")) for u in urls), urls
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------------
# flood, timeouts, micro-batching
# ------------------------------------------------------------------------------------------------
def test_flood_gets_503_not_a_crash(model_file: Path, tmp_path: Path):
    body = _png_bytes(BENT)
    with _serve_process(
        model_file, tmp_path, "--queue-size", "2", "--max-batch", "1", "--batch-wait-ms", "0", "--max-batch-images", "1"
    ) as s:
        n = 16
        barrier = threading.Barrier(n)

        def one(_: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(s.base + "/v1/score", files={"file": ("p.png", body, "image/png")}, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(one, range(n)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "queue full" in r.json()["detail"]
        stats = s.get("/v1/stats").json()
        assert stats["rejected_queue_full"] == codes.count(503) and stats["images"] == codes.count(200)
        assert stats["admitted_now"] == 0 and stats["largest_batch"] == 1
        assert s.get("/healthz").status_code == 200
        assert s.post("/v1/score", files={"file": ("again.png", body, "image/png")}).status_code == 200
        assert s.proc.poll() is None


def test_timeout_answers_504_and_drops_the_waiting_image(model_file: Path):
    torch.set_num_threads(1)
    slow = SPADE.load(model_file, runtime=RUNTIME)
    real_predict = slow.predict

    def predict_slowly(images: list[np.ndarray]) -> object:
        time.sleep(1.5)
        return real_predict(images)

    slow.predict = predict_slowly  # instance attribute: only this model is slowed
    app = create_app(slow, ServiceSettings(request_timeout_s=0.5, max_batch=1, batch_wait_ms=0, warmup=False))
    body = _png_bytes(BENT)
    with _serve_in_thread(app) as s:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(s.post, "/v1/score", files={"file": ("first.png", body, "image/png")})
            time.sleep(0.15)
            second = pool.submit(s.post, "/v1/score", files={"file": ("second.png", body, "image/png")})
            for r in (first.result(), second.result()):
                assert r.status_code == 504, r.text
                assert "request timeout of 0.5 s" in r.json()["detail"]
        time.sleep(2.0)  # the first image's slow prediction finishes; the second was never started
        stats = s.get("/v1/stats").json()
        assert stats["images"] == 1 and stats["skipped_timed_out"] == 1 and stats["admitted_now"] == 0
        assert s.get("/healthz").status_code == 200


def test_micro_batching_groups_concurrent_requests_with_unchanged_scores(model: SPADE, model_file: Path):
    torch.set_num_threads(1)
    app = create_app(
        SPADE.load(model_file, runtime=RUNTIME), ServiceSettings(max_batch=8, batch_wait_ms=1500, warmup=False)
    )
    paths = [*TEST_IMAGES, TRANSISTOR / "test" / "cut_lead" / "000.png"]
    label = {p: f"{p.parent.name}_{p.name}" for p in paths}  # unique upload names (the stems repeat)
    expected = {label[p]: float(model.predict([str(p)]).image_scores[0]) for p in paths}
    with _serve_in_thread(app) as s:
        barrier = threading.Barrier(len(paths))

        def one(p: Path) -> dict:
            barrier.wait()
            r = s.post("/v1/score", files={"file": (label[p], _png_bytes(p), "image/png")})
            assert r.status_code == 200, r.text
            return r.json()

        with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
            results = list(pool.map(one, paths))
        stats = s.get("/v1/stats").json()
    assert stats["images"] == 4 and stats["batches"] < 4 and stats["largest_batch"] >= 2, stats
    assert [r["name"] for r in results] == [label[p] for p in paths]  # every answer went to its own request
    for res in results:
        assert _rel(res["image_score"], expected[res["name"]]) <= 1e-6
    assert len({round(x, 6) for x in expected.values()}) == len(paths)  # distinct scores: a mix-up would show


# ------------------------------------------------------------------------------------------------
# the pieces on their own: batcher, decoding uploads
# ------------------------------------------------------------------------------------------------
def test_batcher_batches_bounds_isolates_and_skips_cancelled():
    calls: list[list[int]] = []
    gate = threading.Event()

    def score(items: list[int]) -> list[int]:
        gate.wait(5)
        calls.append(list(items))
        if -1 in items:
            raise ValueError("bad item")
        return [x * 10 for x in items]

    b: MicroBatcher[int, int] = MicroBatcher(score, max_batch=3, wait_s=0.05, capacity=6)
    try:
        adm = b.admit(6)
        with pytest.raises(QueueFull):
            b.admit(1)
        futures = b.submit([1, 2, 3, -1, 4, 5])
        futures[5].cancel()  # its request timed out while it waited: it must not be scored
        gate.set()
        assert [futures[i].result(5) for i in (0, 1, 2, 4)] == [10, 20, 30, 40]
        with pytest.raises(ValueError, match="bad item"):
            futures[3].result(5)
        adm.release()
        assert b.admitted == 0 and b.admit(6).n == 6
    finally:
        b.close()
    # A full batch, then the next one fails and is retried item by item so 4 still gets its answer.
    assert calls == [[1, 2, 3], [-1, 4], [-1], [4]]
    assert (b.stats.batches, b.stats.images, b.stats.largest_batch) == (2, 4, 3)
    assert (b.stats.skipped_cancelled, b.stats.failed, b.stats.rejected) == (1, 1, 1)


def test_read_image_bytes_equals_read_image_and_checks_before_decoding():
    data = BENT.read_bytes()
    assert np.array_equal(read_image_bytes(data, "x.png"), read_image(BENT))
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: 100000x100000"):
        read_image_bytes(_png_header_only(100_000, 100_000), "bomb.png")
    with pytest.raises(ImageError, match=r"g\.gif: not an image .*accepted: PNG"):
        read_image_bytes(_gif_bytes(), "g.gif", formats=("PNG",))
    assert read_image_bytes(_gif_bytes(), "g.gif").shape == (32, 32, 3)  # every Pillow format by default


def test_several_worker_processes_each_load_the_model(model_file: Path, tmp_path: Path, server: Server):
    """--workers 2: uvicorn imports the app factory in two processes (model path passed by environment)."""
    reference = _score(server, BENT)["image_score"]
    with _serve_process(model_file, tmp_path, "--workers", "2") as s:
        for _ in range(4):
            assert _score(s, BENT)["image_score"] == reference
        # The kernel spreads connections over the workers, so one /v1/stats may reach a worker that scored
        # nothing yet: ask until the worker(s) that scored the 4 images have answered (each request is new).
        images_by_pid: dict[int, int] = {}
        for _ in range(40):
            stats = s.get("/v1/stats").json()
            images_by_pid[stats["pid"]] = stats["images"]
            if sum(images_by_pid.values()) >= 4:
                break
        assert s.proc.pid not in images_by_pid  # answered by workers, not the parent
        assert sum(images_by_pid.values()) == 4, images_by_pid


def test_padded_geometry_pictures_cover_the_image_only(tmp_path: Path):
    """geometry="pad": the overlay is the model's own padded crop; outline and map_max ignore the padding."""
    from conftest import make_image

    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    train = [make_image(rng, size=48)[8:40] for _ in range(6)]  # 32 x 48: wider than tall, so padded
    model = SPADE(k=2, image_size=48, crop_size=48, geometry="pad").fit(train)
    # A pixel threshold inside the range of the maps, so that there is an outline to check.
    probe = model.predict([train[0]])
    model.set_thresholds(
        Thresholds(image=0.0, pixel=float(np.median(probe.anomaly_maps[0][probe.valid[0]])), source="test", n_images=1)
    )
    test = make_image(rng, size=48, defect=True)[8:40]
    buf = io.BytesIO()
    Image.fromarray(test).save(buf, "PNG")
    pred = model.predict([read_image_bytes(buf.getvalue(), "t.png")])
    assert pred.valid is not None and not pred.valid[0].all()  # there is padding
    with _serve_in_thread(create_app(model, ServiceSettings(warmup=False))) as s:
        r = s.post("/v1/score?map=true", files={"file": ("wide.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    res = r.json()
    valid = pred.valid[0]
    assert _rel(res["image_score"], float(pred.image_scores[0])) <= 1e-6
    assert res["map_max"] == pytest.approx(float(pred.anomaly_maps[0][valid].max()))
    outline = _decode_png(res["outline_png"])
    assert outline.shape == (48, 48, 4) and not (outline[:, :, 3][~valid] > 0).any()
    mask = (pred.anomaly_maps[0] >= model.thresholds_.pixel) & valid
    assert res["anomalous_pixel_fraction"] == pytest.approx(mask.sum() / valid.sum())
    overlay = _decode_png(res["overlay_png"])
    assert overlay.shape == (48, 48, 3)
