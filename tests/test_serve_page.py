"""The page of `sanf serve` (``sanf_pipeline/serve/static/index.html``) in a real headless browser (Debian's chromium,
driven by Playwright): a tiny patch-knn run served by ``python -m sanf_pipeline serve``; the page's score, decision and
percentile for an upload equal the server's JSON for the same files and `sanf score`'s CSV; the threshold slider
re-decides on the client (keyboard and pointer-free ``fill``), and resets to the run's threshold; the heat-map overlay
lines up with its image and toggles; the model panel shows the run; a non-image gives the server's error in the
error box; a token-protected server asks for the token and retries; the picker works from the keyboard; nothing
overflows at 1280x800 nor at 390 px. The screenshot ``docs/serve-page.png`` is written when it is missing or with
``SANF_UPDATE_SCREENSHOT=1`` (then from a small MVTec LOCO juice-bottle run when ``../shared`` has its zip and the
DINOv2 weights; otherwise from the tiny run), so that running the tests leaves the checkout as it was.

Skipped, with the reason, without a chromium executable, Playwright's Python package, fastapi or uvicorn."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, SHARED, extract_config, sub_env

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
if CHROMIUM is None:
    pytest.skip("no chromium executable on PATH (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'sanf[serve]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'sanf[serve]')")
expect = sync_api.expect

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCREENSHOT = REPO / "docs" / "serve-page.png"
JUICE_ZIP = SHARED / "data" / "loco-juice-bottle.zip"
DINOV2 = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"
START_S = 240  # a cold start on a busy 2-core machine: python, torch, the backbone, the run
WAIT_MS = 60_000  # the longest any one browser condition may take (a scoring request on a busy machine)
NOT_AN_IMAGE = b"this is plain text, not a PNG\n"


# ------------------------------------------------------------------------------------------------- the server
class Server:
    """``python -m sanf_pipeline serve`` in a subprocess, on a free port read from its ``serving ... on URL`` line."""

    def __init__(self, run, log_path: Path, token: str | None = None):
        env = sub_env()
        env.pop("SANF_SERVE_TOKEN", None)
        if token is not None:
            env["SANF_SERVE_TOKEN"] = token  # the environment, not argv: ps shows no secret
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")
        run = Path(run).resolve()  # served from its parent folder: the page shows the run's own name
        self.proc = subprocess.Popen([sys.executable, "-m", "sanf_pipeline", "serve", "--run", run.name, "--port", "0",
                                      "--host", "127.0.0.1", "--device", "cpu"], cwd=run.parent,
                                     stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, env=env,
                                     text=True, encoding="utf-8")
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_S) or self.url is None:
            self.stop()
            raise AssertionError(f"`sanf serve` printed no 'serving ... on URL' line in {START_S} s:\n"
                                 f"stdout: {self.lines}\nstderr: {log_path.read_text(encoding='utf-8')[-3000:]}")

    def _read(self):
        for line in self.proc.stdout:  # keeps the pipe drained for the server's whole life
            self.lines.append(line.rstrip("\n"))
            if self.url is None and line.startswith("serving ") and " on http://" in line:
                self.url = line.rsplit(" on ", 1)[1].strip()
                self._ready.set()
        self._ready.set()  # exited

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()


def http(url: str, data: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of a GET or POST (``data``), an error status included."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_files(server: Server, paths, names=None, token: str | None = None):
    """``POST /v1/score`` of ``paths`` (sent as ``names``) as multipart/form-data, field ``files``."""
    boundary = uuid.uuid4().hex
    parts = []
    for p, name in zip(paths, names or [Path(p).name for p in paths], strict=True):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + Path(p).read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return http(server.url + "/v1/score", body, headers)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_run(folder_dataset, tmp_path_factory):
    """A tiny cache and a patch-knn baseline run on it (as test_maps.py's ``tiny_runs``), and upload files: a normal
    and an odd image of the tiny dataset under distinct names, and a text file named ``.png``."""
    from sanf_pipeline.extract.job import extract
    from sanf_pipeline.jobs.api import baseline_run

    root = tmp_path_factory.mktemp("serve-page")
    cache = root / "cache"
    extract(extract_config(folder_dataset, cache, dtype="float32"))
    baseline_run(cache, "a", "patch-knn", root / "pk", plots=False, quiet=True, device="cpu")
    up = root / "uploads"
    up.mkdir()
    images = [up / "normal-a.png", up / "odd ✓ été.png"]  # a non-ASCII name survives the round trip
    shutil.copy(folder_dataset / "test" / "a" / "000.png", images[0])
    shutil.copy(folder_dataset / "test" / "c" / "001.png", images[1])
    bad = up / "notes.png"
    bad.write_bytes(NOT_AN_IMAGE)
    return {"run": root / "pk", "images": images, "bad": bad, "root": root}


@pytest.fixture(scope="module")
def server(tiny_run):
    s = Server(tiny_run["run"], tiny_run["root"] / "serve.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI: no sandbox
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    pg.set_default_timeout(WAIT_MS)
    problems = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.problems = problems
    yield pg
    ctx.close()


def open_page(page, server):
    page.goto(server.url + "/")
    expect(page.get_by_test_id("model-normal_class")).to_be_visible()  # /v1/model answered


def cards(page):
    return page.get_by_test_id("result")


def shown(card) -> dict:
    score = card.get_by_test_id("score")
    return {"filename": card.get_by_test_id("filename").inner_text(), "score": float(score.get_attribute("data-value")),
            "score_text": score.inner_text(), "decision": card.get_by_test_id("decision").inner_text(),
            "percentile": card.get_by_test_id("percentile").inner_text()}


def threshold_shown(page) -> float:
    return float(page.get_by_test_id("threshold-value").get_attribute("data-value"))


def no_horizontal_overflow(page) -> bool:
    return page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")


def images_loaded(page):
    page.wait_for_function("() => [...document.images].every((i) => i.complete && i.naturalWidth > 0)")


# ---------------------------------------------------------------------------------------------------- tests
def test_upload_shows_the_servers_and_sanf_scores_results(page, server, tiny_run, tmp_path):
    from click.testing import CliRunner

    from sanf_pipeline.cli.main import cli

    images = tiny_run["images"]
    status, api = post_files(server, images)
    assert status == 200, api
    csv_path = tmp_path / "scores.csv"
    r = CliRunner().invoke(cli, ["score", "--run", str(tiny_run["run"]), *map(str, images), "--out", str(csv_path),
                                 "--quiet", "--num-workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = {Path(row["path"]).name: row for row in csv.DictReader(csv_path.open(encoding="utf-8"))}

    open_page(page, server)
    page.get_by_test_id("file-input").set_input_files([str(p) for p in images])
    expect(cards(page)).to_have_count(2)
    got = [shown(cards(page).nth(i)) for i in range(2)]
    assert [g["filename"] for g in got] == [p.name for p in images]  # upload order
    for g, want in zip(got, api["results"], strict=True):
        assert g["filename"] == want["filename"]
        assert g["score"] == want["score"]  # the page keeps the JSON's number exactly (JS and Python round-trip)
        assert g["score_text"] == f"{want['score']:.4f}"
        assert g["decision"] == ("anomalous" if want["anomalous"] else "normal")
        assert g["percentile"] == f"{want['percentile']:.1f}%"
        row = rows[g["filename"]]
        assert float(row["score"]) == pytest.approx(want["score"], rel=1e-6, abs=1e-9)
        assert bool(int(row["anomalous"])) == want["anomalous"]

    # the heat maps: one per result, the PNG at the image's own size, drawn over it, and toggled by the checkbox
    maps = page.get_by_test_id("map")
    assert all(res["map_png"] for res in api["results"])
    expect(maps).to_have_count(2)
    images_loaded(page)
    for i, res in enumerate(api["results"]):
        card = cards(page).nth(i)
        size = card.get_by_test_id("map").evaluate("(m) => [m.naturalWidth, m.naturalHeight]")
        assert size == [res["width"], res["height"]]
        base, over = (card.locator(".pic img").nth(k).bounding_box() for k in range(2))
        assert base == over  # the overlay covers its image exactly
    toggle = page.get_by_test_id("overlay-toggle")
    toggle.uncheck()
    expect(maps.first).to_be_hidden()
    toggle.check()
    expect(maps.first).to_be_visible()
    assert no_horizontal_overflow(page)
    assert not page.problems, page.problems


def test_the_slider_re_decides_on_the_client_and_resets(page, server, tiny_run):
    status, api = post_files(server, tiny_run["images"])
    assert status == 200, api
    run_t = api["threshold"]["value"]
    open_page(page, server)
    requests = []
    page.on("request", lambda r: requests.append(r.url) if "/v1/score" in r.url else None)
    page.get_by_test_id("file-input").set_input_files([str(p) for p in tiny_run["images"]])
    expect(cards(page)).to_have_count(2)
    assert threshold_shown(page) == run_t
    slider = page.get_by_test_id("threshold-slider")
    lo, hi, step = (float(slider.get_attribute(a)) for a in ("min", "max", "step"))
    scores = [r["score"] for r in api["results"]]
    assert lo < min(scores + [run_t]) and hi > max(scores + [run_t])  # the range spans the scores and threshold
    reset = page.get_by_test_id("threshold-reset")
    expect(reset).to_be_disabled()

    def decisions():
        return [cards(page).nth(i).get_by_test_id("decision").inner_text() for i in range(2)]

    for i, s in enumerate(scores):
        for v, want in ((s - 3 * step, "anomalous"), (s + 3 * step, "normal")):
            slider.fill(repr(max(lo, min(hi, v))))
            t = threshold_shown(page)
            assert (s > t) == (want == "anomalous")
            expect(cards(page).nth(i).get_by_test_id("decision")).to_have_text(want)
            assert decisions() == ["anomalous" if x > t else "normal" for x in scores]  # every card re-decided
            expect(page.get_by_test_id("threshold-value")).to_have_text(f"{t:.4f}")
    slider.focus()  # the keyboard moves it too
    page.keyboard.press("Home")
    expect(page.get_by_test_id("threshold-value")).to_have_text(f"{lo:.4f}")
    assert decisions() == ["anomalous", "anomalous"]
    page.keyboard.press("End")
    expect(page.get_by_test_id("threshold-value")).to_have_text(f"{hi:.4f}")
    assert decisions() == ["normal", "normal"]
    expect(reset).to_be_enabled()
    reset.click()
    expect(page.get_by_test_id("threshold-value")).to_have_text(f"{run_t:.4f}")
    assert threshold_shown(page) == run_t
    assert decisions() == ["anomalous" if r["anomalous"] else "normal" for r in api["results"]]
    expect(reset).to_be_disabled()
    assert len(requests) == 1  # the slider never asked the server
    assert not page.problems, page.problems


def test_the_model_panel_describes_the_run(page, server):
    status, model = http(server.url + "/v1/model")
    assert status == 200
    open_page(page, server)
    panel = page.get_by_test_id("model")
    expect(panel.get_by_test_id("model-normal_class")).to_have_text(model["normal_class"])
    expect(panel.get_by_test_id("model-backbone")).to_have_text(model["backbone"])
    expect(panel.get_by_test_id("model-method")).to_have_text(model["method"])
    expect(panel.get_by_test_id("model-score")).to_contain_text(model["score_description"])
    expect(panel.get_by_test_id("model-threshold")).to_contain_text(f"{model['threshold']['value']:.4f}")
    expect(panel.get_by_test_id("model-threshold")).to_contain_text("target FPR 1%")
    expect(panel.get_by_test_id("model-pixel_threshold")).to_contain_text(f"{model['pixel_threshold']['value']:.4f}")
    expect(panel.get_by_test_id("model-metrics")).to_contain_text(f"AUROC{model['metrics']['auroc']:.3f}")
    expect(panel.get_by_test_id("model-limits")).to_contain_text(f"images per upload{model['limits']['max_images']}")
    expect(page.get_by_test_id("run-name")).to_have_text(f"run {Path(model['run']).name}")
    assert not page.problems, page.problems


def test_a_non_image_shows_the_servers_error(page, server, tiny_run):
    bad = tiny_run["bad"]
    status, body = post_files(server, [bad])
    assert status == 422 and body["error"]
    open_page(page, server)
    page.get_by_test_id("file-input").set_input_files(str(tiny_run["images"][0]))
    expect(cards(page)).to_have_count(1)
    error = page.get_by_test_id("error")
    expect(error).to_be_hidden()
    page.get_by_test_id("file-input").set_input_files(str(bad))
    expect(error).to_be_visible()
    expect(error).to_contain_text(body["error"])
    expect(cards(page)).to_have_count(1)  # what was shown stays
    error.get_by_role("button", name="Dismiss error").click()
    expect(error).to_be_hidden()
    # an image after the error scores again and clears nothing but the error
    page.get_by_test_id("file-input").set_input_files(str(bad))
    expect(error).to_be_visible()
    page.get_by_test_id("file-input").set_input_files(str(tiny_run["images"][1]))
    expect(cards(page)).to_have_count(2)
    expect(error).to_be_hidden()
    # only the favicon-free page's own 422 may be in the console (the browser logs failed requests)
    assert all("422" in p or "Unprocessable" in p for p in page.problems), page.problems


def test_the_picker_works_from_the_keyboard(page, server, tiny_run):
    open_page(page, server)
    # intercept file choosers from here on: expect_file_chooser alone turns interception on only as the key goes
    # down, and a chooser that opens first is lost (headless: cancelled)
    page.on("filechooser", lambda chooser: None)
    page.evaluate("0")  # one round trip: the interception is on
    page.keyboard.press("Tab")  # the first stop on the page is the picker
    assert page.evaluate("() => document.activeElement.id") == "file"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
    chooser.value.set_files(str(tiny_run["images"][0]))
    expect(cards(page)).to_have_count(1)
    expect(page.get_by_test_id("file-input")).to_have_accessible_name(re.compile(r"^Choose images or drop them here"))
    assert not page.problems, page.problems


def test_a_token_server_asks_for_the_token_and_retries(browser, tiny_run, tmp_path):
    token = "s3cret-" + uuid.uuid4().hex[:8]
    srv = Server(tiny_run["run"], tmp_path / "serve-token.log", token=token)
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(srv.url + "/")
        box = page.get_by_test_id("token-box")
        expect(box).to_be_visible()  # /v1/model answered 401
        status, body = http(srv.url + "/v1/model")
        assert status == 401
        expect(page.get_by_test_id("error")).to_contain_text(body["error"])
        token_input = page.get_by_label("Access token")
        expect(token_input).to_be_focused()
        token_input.fill("wrong")
        token_input.press("Enter")
        expect(page.get_by_test_id("error")).to_contain_text("not accepted")
        page.get_by_test_id("file-input").set_input_files(str(tiny_run["images"][0]))
        expect(page.get_by_test_id("error")).to_contain_text("not accepted")  # still the wrong token
        expect(cards(page)).to_have_count(0)
        token_input.fill(token)
        token_input.press("Enter")  # the model panel loads and the waiting upload is sent again
        expect(page.get_by_test_id("model-normal_class")).to_have_text("a")
        expect(cards(page)).to_have_count(1)
        expect(page.get_by_test_id("error")).to_be_hidden()
        status, api = post_files(srv, tiny_run["images"][:1], token=token)
        assert status == 200
        assert float(cards(page).first.get_by_test_id("score").get_attribute("data-value")) == \
            api["results"][0]["score"]
    finally:
        ctx.close()
        srv.stop()


def test_narrow_screen_keeps_the_slider_before_the_results(browser, server, tiny_run):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                              has_touch=True)
    try:
        page = ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        open_page(page, server)
        page.get_by_test_id("file-input").set_input_files([str(p) for p in tiny_run["images"]])
        expect(cards(page)).to_have_count(2)
        images_loaded(page)
        assert no_horizontal_overflow(page)
        slider = page.get_by_test_id("threshold-slider").bounding_box()
        first = cards(page).first.bounding_box()
        model = page.get_by_test_id("model").bounding_box()
        assert slider["y"] < first["y"] < model["y"]  # upload, threshold, results, model
        assert first["x"] >= 0 and first["x"] + first["width"] <= 390
    finally:
        ctx.close()


# ------------------------------------------------------------------------------------------------ screenshot
def juice_bottle_run(root: Path):
    """A patch-knn run of DINOv2-S (layer 8, 224 px) on 24 normal juice bottles and the first test images (about
    20 s on two cores), and two test images to show; None without the shared zip or weights."""
    if not (JUICE_ZIP.is_file() and DINOV2.is_file()):
        return None
    from sanf_pipeline.extract.job import ExtractConfig, extract
    from sanf_pipeline.jobs.api import baseline_run

    data, shown_dir = root / "data", root / "uploads"
    with zipfile.ZipFile(JUICE_ZIP) as zf:
        names = [n for n in zf.namelist() if n.endswith((".png", ".jpg")) and (
            (n.startswith("juice_bottle/train/good/") and int(Path(n).stem) < 24)
            or (n.startswith("juice_bottle/test/") and int(Path(n).stem) < 3))]
        for n in names:
            zf.extract(n, data)
    extract(ExtractConfig(backbone="vit_small_patch14_dinov2", dataset="mvtec", category="juice_bottle",
                          data_root=str(data), cache=str(root / "cache"), weights=str(DINOV2), image_size=224,
                          layer=8, batch_size=8, num_workers=0, quiet=True, dtype="float32"))
    run = root / "juice_bottle-patch-knn"
    baseline_run(root / "cache", "good", "patch-knn", run, plots=False, quiet=True, device="cpu")
    test = data / "juice_bottle" / "test"
    shown_dir.mkdir()
    files = []
    for src, name in ((test / "good" / "000.jpg", "bottle-good-000.jpg"),
                      (test / "logical_anomalies" / "000.jpg", "bottle-logical-000.jpg"),
                      (test / "logical_anomalies" / "002.jpg", "bottle-logical-002.jpg")):
        files.append(shutil.copy(src, shown_dir / name))
    return run, files


def test_screenshot(browser, server, tiny_run, tmp_path):
    """The page with results at 1280x800: ``docs/serve-page.png`` when missing or with SANF_UPDATE_SCREENSHOT=1,
    else a file under tmp (the page must render either way)."""
    update = os.environ.get("SANF_UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists()
    out = SCREENSHOT if update else tmp_path / "serve-page.png"
    juice = juice_bottle_run(tmp_path / "juice") if update else None
    srv = Server(juice[0], tmp_path / "serve-juice.log") if juice else server
    files = juice[1] if juice else tiny_run["images"]
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        open_page(page, srv)
        page.get_by_test_id("file-input").set_input_files([str(p) for p in files])
        expect(cards(page)).to_have_count(len(files))
        images_loaded(page)
        shot = page.screenshot()
    finally:
        ctx.close()
        if srv is not server:
            srv.stop()
    import io

    from PIL import Image

    with Image.open(io.BytesIO(shot)) as im:
        assert im.size == (1280, 800)
        out.parent.mkdir(parents=True, exist_ok=True)  # 256 colours: a third of the size, no visible change
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    assert out.stat().st_size < 400_000
