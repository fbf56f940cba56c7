"""`sanf serve` (serve/): the batcher on a stub scorer, step by step with events; then real servers in subprocesses
(`python -m sanf_pipeline serve --port 0`) driven over HTTP with the standard library: served scores equal `sanf
score`'s, maps come back as RGBA PNGs at each image's size, /v1/model, /healthz, /readyz, /metrics, every refusal
(400, 401, 413, 415, 422) as one JSON line, concurrent requests, a request split into batches, an ONNX export served
like its run, and Ctrl-C. No assertion depends on timing: waits have generous timeouts and only bound a hang."""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, assert_user_error, extract_config, sub_env, write_folder_dataset

from sanf_pipeline.cli.main import cli

for _mod in ("fastapi", "uvicorn", "python_multipart", "prometheus_client"):
    pytest.importorskip(_mod, reason="sanf serve needs pip install 'sanf[serve]' (in the dev extra)")

READY_S = 300  # a generous bound on a server's start (imports + loading) on a loaded machine; not a timing test
REQUEST_S = 300
TOKEN = "s3cret-token"


# ------------------------------------------------------------------------------------------------ batcher
class Stub:
    """fn for the Batcher: records each batch, returns 10 * item; optionally blocks a batch until released."""

    def __init__(self, gate_first: bool = False):
        self.batches, self.entered, self.release = [], threading.Event(), threading.Event()
        self.gate_first = gate_first
        if not gate_first:
            self.release.set()

    def __call__(self, items):
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(60), "the test never released the batch"
        if any(i == "boom" for i in items):
            raise RuntimeError("boom")
        return [10 * i for i in items]


def test_batcher_splits_a_request_into_batches_of_at_most_max_batch():
    from sanf_pipeline.serve.batching import Batcher

    stub = Stub()
    b = Batcher(stub, max_batch=4, window_ms=0)
    try:
        assert b.run([1, 2, 3, 4, 5, 6], timeout=60) == [10, 20, 30, 40, 50, 60]
    finally:
        b.close(60)
    assert [len(x) for x in stub.batches] == [4, 2] and list(b.batch_sizes) == [4, 2]


def test_batcher_coalesces_waiting_requests_and_hands_each_its_own():
    from sanf_pipeline.serve.batching import Batcher

    stub, sizes = Stub(), []
    b = Batcher(stub, max_batch=3, window_ms=1e6, on_batch=sizes.append, start=False)  # queued before it starts
    futures = [b.submit([1]), b.submit([2, 3]), b.submit([4])]
    assert b.waiting == 4
    b.start()
    try:
        # 3 waiting fill a batch at once (the long window is never waited for); the 4th then waits alone for the
        # window, so it is released by closing: it fails, the others got theirs
        assert [f.result(60) for f in futures[:2]] == [[10], [20, 30]]
    finally:
        b.close(60)
    assert stub.batches[0] == [1, 2, 3] and sizes == [3]
    with pytest.raises(Exception, match="stopped"):
        futures[2].result(60)


def test_a_request_arriving_during_a_batch_joins_the_next_one():
    from sanf_pipeline.serve.batching import Batcher

    stub = Stub(gate_first=True)
    b = Batcher(stub, max_batch=8, window_ms=0)
    try:
        first = b.submit([1])
        assert stub.entered.wait(60)  # the worker is inside the first batch
        later = [b.submit([2]), b.submit([3, 4])]
        stub.release.set()
        assert first.result(60) == [10] and [f.result(60) for f in later] == [[20], [30, 40]]
    finally:
        b.close(60)
    assert stub.batches == [[1], [2, 3, 4]]


def test_a_failed_batch_fails_only_its_requests_and_the_worker_goes_on():
    from sanf_pipeline.serve.batching import Batcher, BatcherClosed

    stub = Stub()
    b = Batcher(stub, max_batch=2, window_ms=0, start=False)
    bad, good = b.submit([1, "boom"]), b.submit([5])
    b.start()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(60)
        assert good.result(60) == [50] and b.run([7], timeout=60) == [70]
    finally:
        b.close(60)
    with pytest.raises(BatcherClosed):
        b.submit([1])


# ------------------------------------------------------------------------------------------------ pieces
def test_rgba_map_is_jet_with_the_scaled_value_as_alpha():
    from sanf_pipeline.maps.overlay import jet, rgba_map, scale

    m = np.linspace(-1, 3, 60, dtype=np.float32).reshape(6, 10)
    out = rgba_map(m, 0.0, 2.0)
    s = scale(m, 0.0, 2.0)
    assert out.shape == (6, 10, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 3], np.rint(s * 255).astype(np.uint8))
    assert np.abs(out[..., :3].astype(int) - jet(s).astype(int)).max() <= 1  # the overlay's LUT, within rounding
    assert out[0, 0, 3] == 0 and out[-1, -1, 3] == 255


def test_upload_names_are_short_printable_labels():
    from sanf_pipeline.serve.upload import MAX_LABEL, label

    assert label("../../etc/passwd", 0) == "passwd" and label("C:\\x\\y.png", 0) == "y.png"
    assert label("a\x00b\nc.png", 0) == "a?b?c.png" and label("", 2) == "<file 3>" and label(None, 0) == "<file 1>"
    assert len(label("x" * 500, 0)) == MAX_LABEL and label("猫 çà.png", 0) == "猫 çà.png"


# ------------------------------------------------------------------------------------------------ fixtures
def sanf(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny cache, a patch-knn (maps) and a gaussian (class-token) baseline, and `sanf score`'s CSV of each."""
    from sanf_pipeline.extract.job import extract
    from sanf_pipeline.jobs.api import baseline_run

    root = tmp_path_factory.mktemp("serve")
    data = write_folder_dataset(root / "data", n_train=10, n_test=5)
    extract(extract_config(data, root / "cache", dtype="float32"))
    out = {"data": data, "files": sorted((data / "test").rglob("*.png"))}
    for method in ("patch-knn", "gaussian"):
        baseline_run(root / "cache", "a", method, root / method, plots=False, quiet=True, device="cpu")
        r = sanf("score", "--run", root / method, data / "test", "--out", root / f"{method}.csv", "--quiet",
                 "--num-workers", "0", "--device", "cpu")
        assert r.exit_code == 0, r.output
        with open(root / f"{method}.csv", newline="") as fh:
            out[f"{method}.csv"] = {Path(row["path"]): row for row in csv.DictReader(fh)}
        out[method] = root / method
    return out


class Server:
    """`python -m sanf_pipeline serve ... --port 0` in a subprocess; its URL from the ready line on stdout."""

    def __init__(self, *args, log: Path):
        self.log = log
        self._err = open(log, "w", encoding="utf-8")  # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "sanf_pipeline", "serve", "--port", "0", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=sub_env(), cwd=REPO)
        lines: queue.Queue = queue.Queue()

        def read():  # a thread, so that waiting for the line has a timeout
            for line in self.proc.stdout:
                lines.put(line)
            lines.put("")

        threading.Thread(target=read, daemon=True).start()
        try:
            line = lines.get(timeout=READY_S)
        except queue.Empty:
            self.stop()
            pytest.fail(f"the server printed no ready line within {READY_S} s: {self.stderr()}")
        assert line.startswith("serving ") and " on http://127.0.0.1:" in line, (line, self.stderr())
        self.url = line.split(" on ", 1)[1].strip()
        self.host, self.port = self.url.removeprefix("http://").rsplit(":", 1)
        self.port = int(self.port)

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.log.read_text(encoding="utf-8")

    def stop(self) -> int:
        """Ctrl-C, and the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(REQUEST_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(REQUEST_S)
        self._err.close()
        return code

    def get(self, path, token=None):
        return self.request("GET", path, token=token)

    def request(self, method, path, body=None, headers=None, token=None):
        """(status, parsed JSON or text, headers) of one request."""
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_S) as resp:
                status, raw, hdrs = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            status, raw, hdrs = exc.code, exc.read(), exc.headers
        text = raw.decode("utf-8")
        return status, (json.loads(text) if "json" in hdrs.get("content-type", "") else text), hdrs

    def score(self, files, token=None, field="files"):
        body, ctype = multipart(files, field)
        return self.request("POST", "/v1/score", body, {"Content-Type": ctype}, token=token)


def multipart(files, field="files"):
    """(body, content type) of a multipart/form-data body: ``files`` is [(filename, bytes)]."""
    boundary = "sanf-test-boundary-7f3a"
    out = b""
    for name, data in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def uploads(paths):
    return [(f"{p.parent.name}-{p.name}", p.read_bytes()) for p in paths]


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        base, _, rest = key.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if base == name and got == want:
            return float(value)
    return 0.0


def png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG file (valid chunks) whose header says width x height, with almost none of the image data: only a
    check of the header before decoding refuses it for its size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def pk_server(served, tmp_path_factory):
    """The patch-knn run behind a token, with small limits and batches of at most 4."""
    server = Server("--run", served["patch-knn"], "--device", "cpu", "--max-batch", "4", "--max-images", "8",
                    "--max-upload-mb", "0.25", "--max-pixels", "5000", "--token", TOKEN,
                    log=tmp_path_factory.mktemp("pk-log") / "stderr.txt")
    yield server
    assert server.stop() == 0, server.stderr()


def check_against_csv(results, paths, reference, rtol):
    assert len(results) == len(paths)
    for r, p in zip(results, paths, strict=True):
        want = reference[p]
        assert r["filename"] == f"{p.parent.name}-{p.name}"
        np.testing.assert_allclose(r["score"], float(want["score"]), rtol=rtol)
        assert r["anomalous"] == bool(int(want["anomalous"]))
        assert abs(r["percentile"] - float(want["percentile"])) < 1e-3
        assert (r["width"], r["height"]) == (32, 32)


# ------------------------------------------------------------------------------------------------ servers
def test_served_scores_and_maps_equal_sanf_score(served, pk_server):
    from PIL import Image

    from sanf_pipeline import Detector
    from sanf_pipeline.maps.overlay import rgba_map

    files = served["files"]
    results = []
    for i in range(0, len(files), 8):  # --max-images 8
        status, body, _ = pk_server.score(uploads(files[i:i + 8]), token=TOKEN)
        assert status == 200, body
        assert body["score"] == "patch-knn" and body["threshold"]["value"] > 0 and body["pixel_threshold"]["rule"]
        results += body["results"]
    check_against_csv(results, files, served["patch-knn.csv"], rtol=1e-5)

    det = Detector.load(served["patch-knn"], device="cpu")
    want = det.score(files[:3], maps=True, num_workers=0)
    for r, m in zip(results[:3], want.maps, strict=True):
        with Image.open(io.BytesIO(base64.b64decode(r["map_png"]))) as im:
            assert im.mode == "RGBA" and im.size == (32, 32)
            got = np.asarray(im)
        ref = rgba_map(m, *det.pixel_threshold.colour)  # the run's colour scale, alpha = the scaled map
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2
        region = int((m > det.pixel_threshold.value).sum())
        assert isinstance(r["region_pixels"], int) and abs(r["region_pixels"] - region) <= max(1, region // 100)
        assert r["threshold"] == body["threshold"]["value"] and r["target_fpr"] == body["threshold"]["target_fpr"]


def test_model_health_readiness_and_metrics(served, pk_server):
    status, info, _ = pk_server.get("/v1/model", token=TOKEN)
    assert status == 200
    assert info["method"] == "patch-knn" and info["score"] == "patch-knn" and info["maps"] is True
    assert info["normal_class"] == "a" and info["backbone"] == "vit_small_patch14_dinov2"
    assert info["input_size"] == [3, 56, 56] and info["threshold"]["target_fpr"] == 0.01
    assert info["pixel_threshold"]["rule"] == "image-max" and info["metrics"]["auroc"] is not None
    assert info["limits"] == {"max_upload_mb": 0.25, "max_upload_bytes": 262144, "max_images": 8, "max_pixels": 5000}
    assert info["batch"] == {"window_ms": 5.0, "max_batch": 4} and "patch token" in info["score_description"]
    assert pk_server.get("/healthz")[:2] == (200, {"status": "ok"})
    assert pk_server.get("/readyz")[:2] == (200, {"ready": True})
    status, page, hdrs = pk_server.get("/")
    assert status == 200 and "text/html" in hdrs["content-type"] and "<html" in page.lower()

    _, before, _ = pk_server.get("/metrics", token=TOKEN)
    assert pk_server.score(uploads(served["files"][:2]), token=TOKEN)[0] == 200
    _, after, hdrs = pk_server.get("/metrics", token=TOKEN)
    assert hdrs["content-type"].startswith("text/plain")
    assert metric(after, "sanf_images_total") - metric(before, "sanf_images_total") == 2
    key = {"path": "/v1/score", "status": "200"}
    assert metric(after, "sanf_requests_total", **key) - metric(before, "sanf_requests_total", **key) == 1
    assert metric(after, "sanf_request_seconds_count", path="/v1/score") >= 1
    assert metric(after, "sanf_requests_total", path="/healthz", status="200") >= 1
    log = pk_server.stderr()
    assert "GET /healthz 200 0 images" in log and "POST /v1/score 200 2 images" in log and " ms" in log


def test_every_refusal_is_one_json_line(served, pk_server):
    good = served["files"][0].read_bytes()

    def refused(answer, status, *fragments):
        got, body, _ = answer
        assert got == status and set(body) == {"error"} and "\n" not in body["error"], (got, body)
        for f in fragments:
            assert f in body["error"], (f, body)

    def post(body, ctype=None):
        return pk_server.request("POST", "/v1/score", body, {"Content-Type": ctype} if ctype else {}, token=TOKEN)

    def score(files, field="files"):
        return pk_server.score(files, token=TOKEN, field=field)

    refused(post(b""), 400, "empty request")
    refused(post(b"", multipart([])[1]), 400, "empty request")
    refused(post(*multipart([])), 400, "no images")
    refused(score([("x.png", good)], field="other"), 400, "no images", "'files'")
    refused(post(b"--nope\r\n", multipart([])[1]), 400, "multipart")
    refused(post(b'{"files": []}', "application/json"), 415, "multipart/form-data", "application/json")
    refused(score([("notes.txt", b"hello, not an image")]), 422, "notes.txt", "not a recognised image format")
    refused(score([("ok.png", good), ("cut.png", good[: len(good) // 2])]), 422, "cut.png", "truncated")
    refused(score([("empty.png", b"")]), 422, "empty.png", "empty file")
    refused(score([(f"{i}.png", good) for i in range(9)]), 413, "more than 8 images", "--max-images")
    refused(score([("big.png", png_header_only(10000, 10000))]), 413, "big.png", "10000x10000", "--max-pixels")
    refused(score([("wide.png", png(np.zeros((40, 200, 3))))]), 413, "wide.png", "200x40", "--max-pixels")
    # over --max-upload-mb (0.25): by Content-Length, before reading the body ...
    refused(score([(f"{i}.png", good + b"\0" * 40_000) for i in range(7)]), 413, "--max-upload-mb")
    # ... and counted as it streams when the client sends no length (chunked)
    body, ctype = multipart([(f"{i}.png", good + b"\0" * 40_000) for i in range(7)])
    conn = http.client.HTTPConnection(pk_server.host, pk_server.port, timeout=REQUEST_S)
    try:
        conn.request("POST", "/v1/score", body=(body[i:i + 16384] for i in range(0, len(body), 16384)),
                     headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"}, encode_chunked=True)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413 and "--max-upload-mb" in answer["error"]
    assert pk_server.get("/v1/nope", token=TOKEN)[:2] == (404, {"error": "Not Found"})
    status, body, _ = pk_server.score([("../dir/çà 猫\x01.png", good)], token=TOKEN)  # still serving after all that
    assert status == 200 and body["results"][0]["filename"] == "çà 猫?.png"  # a label, not a path
    assert "Traceback" not in pk_server.stderr()


def test_the_token_guards_the_api_but_not_the_probes(served, pk_server):
    files = uploads(served["files"][:1])
    for token in (None, "wrong", TOKEN + "x"):
        status, body, hdrs = pk_server.score(files, token=token)
        assert status == 401 and "bearer token" in body["error"] and hdrs["WWW-Authenticate"] == "Bearer"
        assert pk_server.get("/v1/model", token=token)[0] == 401 and pk_server.get("/metrics", token=token)[0] == 401
    status, body, _ = pk_server.request("GET", "/v1/model", headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401
    big, ctype = multipart([("x.png", b"\0" * 200_000)])  # refused unread: the client still gets the answer
    assert pk_server.request("POST", "/v1/score", big, {"Content-Type": ctype})[0] == 401
    assert pk_server.get("/healthz")[0] == 200 and pk_server.get("/readyz")[0] == 200 and pk_server.get("/")[0] == 200
    assert pk_server.score(files, token=TOKEN)[0] == 200


def test_concurrent_requests_get_their_own_results_and_share_batches(served, pk_server):
    files, reference = served["files"], served["patch-knn.csv"]
    groups = [files[i:i + 2] for i in range(0, 14, 2)] + [files[13:]]

    def post(paths):
        status, body, _ = pk_server.score(uploads(paths), token=TOKEN)
        assert status == 200, body
        return paths, body["results"]

    with ThreadPoolExecutor(len(groups)) as pool:
        for paths, results in pool.map(post, groups):
            check_against_csv(results, paths, reference, rtol=1e-5)

    # one request of 6 images, nothing else in flight: batches of 4 and 2 (--max-batch 4)
    _, before, _ = pk_server.get("/metrics", token=TOKEN)
    status, body, _ = pk_server.score(uploads(files[:6]), token=TOKEN)
    assert status == 200
    check_against_csv(body["results"], files[:6], reference, rtol=1e-5)
    _, after, _ = pk_server.get("/metrics", token=TOKEN)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("sanf_batch_size_count") == 2 and delta("sanf_batch_size_sum") == 6
    assert delta("sanf_batch_size_bucket", le="2.0") == 1 and delta("sanf_batch_size_bucket", le="4.0") == 2
    assert metric(after, "sanf_batch_size_bucket", le="1.0") < metric(after, "sanf_batch_size_count")


def test_a_class_token_run_has_no_maps_and_ctrl_c_stops_it(served, tmp_path):
    server = Server("--run", served["gaussian"], "--device", "cpu", log=tmp_path / "stderr.txt")
    try:
        files = served["files"]
        status, body, _ = server.score(uploads(files))
        assert status == 200 and body["score"] == "gaussian" and body["pixel_threshold"] is None
        check_against_csv(body["results"], files, served["gaussian.csv"], rtol=1e-5)
        assert all(r["map_png"] is None and r["region_pixels"] is None for r in body["results"])
        status, info, _ = server.get("/v1/model")
        assert status == 200 and info["maps"] is False and info["method"] == "gaussian"
    finally:
        code = server.stop()
    assert code == 0, server.stderr()
    assert server.stderr().strip().splitlines()[-1] == f"stopped serving {served['gaussian']}"


def test_an_onnx_export_serves_the_runs_scores(served, pk_server, tmp_path):
    pytest.importorskip("onnxruntime")
    from sanf_pipeline import Detector
    from sanf_pipeline.detect.export import export_detector

    path = tmp_path / "pk.onnx"
    export_detector(Detector.load(served["patch-knn"], device="cpu"), path)
    r = sanf("serve", "--export", path, "--score", "nll")
    assert_user_error(r, "--score", "--run only")
    server = Server("--export", path, "--max-batch", "4", log=tmp_path / "stderr.txt")
    try:
        files = served["files"][:8]
        status, body, _ = server.score(uploads(files))
        assert status == 200, body
        _, eager, _ = pk_server.score(uploads(files), token=TOKEN)
        for got, want in zip(body["results"], eager["results"], strict=True):
            np.testing.assert_allclose(got["score"], want["score"], rtol=1e-4)
            assert got["map_png"] and (got["width"], got["height"]) == (32, 32)
        assert body["threshold"]["value"] == pytest.approx(eager["threshold"]["value"], rel=1e-6)
        assert body["pixel_threshold"]["value"] == pytest.approx(eager["pixel_threshold"]["value"], rel=1e-6)
        status, info, _ = server.get("/v1/model")
        assert info["engine"].startswith("onnxruntime") and info["maps"] is True and info["score"] == "patch-knn"
    finally:
        code = server.stop()
    assert code == 0, server.stderr()


# ------------------------------------------------------------------------------------------------ the command
def test_arguments_are_checked_before_anything_loads(served, tmp_path):
    assert_user_error(sanf("serve", "--run", tmp_path / "nope"), "does not exist")
    assert_user_error(sanf("serve", "--run", tmp_path), "no config.json")
    assert_user_error(sanf("serve"), "--run", "--export")
    assert_user_error(sanf("serve", "--run", served["gaussian"], "--export", tmp_path / "x.onnx"), "one of them")
    assert_user_error(sanf("serve", "--export", tmp_path / "x.onnx"), "not a file")
    (tmp_path / "x.onnx").write_bytes(b"onnx?")
    assert_user_error(sanf("serve", "--export", tmp_path / "x.onnx"), "sidecar")
    assert_user_error(sanf("serve", "--run", served["gaussian"], "--token", "two words"), "--token", "spaces")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_user_error(sanf("serve", "--run", served["gaussian"], "--port", port), "cannot listen", str(port))
    # in a fresh process: a bad --run fails as one line without importing torch or the web stack
    code = ("import sys\nfrom sanf_pipeline.cli.main import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as e:\n    print(e.code, sorted(m for m in ('torch', 'fastapi', 'uvicorn') "
            "if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code, "serve", "--run", str(tmp_path / "nope")], capture_output=True,
                       text=True, env=sub_env(), cwd=REPO, timeout=REQUEST_S)
    assert r.stdout.strip() == "2 []" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r


def test_an_unexpected_failure_is_a_one_line_500(served, tmp_path):
    """In-process: a scorer that breaks on scoring gives a JSON 500 and one log line, and the server goes on."""
    import asyncio

    import uvicorn

    from sanf_pipeline.serve.app import create_app

    class Broken:
        def prepare(self, image):
            return image

        def score_prepared(self, items):
            raise RuntimeError("the model fell over")

        def info(self):
            return {"score": "x", "threshold": None, "pixel_threshold": None}

    lines = []
    app = create_app(Broken(), log=lines.append)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    started = threading.Event()

    class S(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            started.set()

    server = S(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        assert started.wait(READY_S)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        body, ctype = multipart([("a.png", served["files"][0].read_bytes())])
        req = urllib.request.Request(url + "/v1/score", data=body, headers={"Content-Type": ctype})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=REQUEST_S)
        assert err.value.code == 500
        assert json.loads(err.value.read()) == {"error": "internal error (RuntimeError); the server log has the "
                                                         "details"}
        with urllib.request.urlopen(url + "/healthz", timeout=REQUEST_S) as resp:
            assert resp.status == 200
    finally:
        server.should_exit = True
        thread.join(REQUEST_S)
        sock.close()
    assert "error: POST /v1/score: RuntimeError: the model fell over" in lines
    assert "POST /v1/score 500 1 image" in " ".join(lines)


def test_serve_takes_an_explicit_threshold(served, monkeypatch):
    """`sanf serve --threshold T` decides at T (the page and /v1/model show it); with --fpr it is refused at once."""
    from sanf_pipeline.cli import serve as serve_cli

    r = sanf("serve", "--run", served["gaussian"], "--threshold", "1", "--fpr", "0.1")
    assert r.exit_code == 2 and "exclude each other" in r.output
    seen = {}
    monkeypatch.setattr(serve_cli, "_run", lambda scorer, sock, *a, **k: seen.update(scorer=scorer))
    r = sanf("serve", "--run", served["gaussian"], "--threshold", "123.5", "--port", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    thr = seen["scorer"].threshold
    assert thr["value"] == 123.5 and thr["explicit"] and thr["target_fpr"] is None
