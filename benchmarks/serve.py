"""`sanf serve` under a bounded concurrent load: throughput, latency, micro-batching, memory, and `sanf score` on the
same images for comparison and for correctness.

Steps (everything through the project's own CLI, ``python -m sanf_pipeline ...`` as subprocesses):

1. The run. Default: a small MVTec-layout subset of ``../shared/data/loco-juice-bottle.zip`` (the first
   ``--train`` ``train/good`` images for fitting; ``--test`` test images, half ``good`` and half
   ``logical_anomalies``, evenly spread, with their masks), ``sanf extract --dataset mvtec`` (``--backbone``,
   ``--weights``, ``--layer``, ``--image-size``) and ``sanf baseline --method patch-knn`` (maps on), all under
   ``--work`` (re-used on a rerun). Or ``--run RUN --images DIR``: an existing run and the images to score (every
   image file under DIR, recursively).
2. ``sanf serve --run RUN --port 0 --device cpu`` (``--max-batch``, ``--batch-window-ms`` passed through) as a
   subprocess; ready once it prints ``serving RUN on http://HOST:PORT`` and ``/readyz`` answers 200.
3. A warm-up: one request each of 1, 2, ..., ``--clients`` images (every batch size the load can produce runs
   once), then ``2 x --clients`` concurrent one-image requests. Then two identical load phases: ``--clients``
   threads for ``--seconds`` each (at most 120), each POSTing one image per request to ``/v1/score`` on its own
   keep-alive ``http.client`` connection, the clients together cycling over the test images in order. Per phase:
   requests, images/s (completed images / the phase's wall time, last answer included), p50/p90/p99/max latency,
   errors (any non-200 or connection failure makes the script fail), the batch sizes the server ran (the
   ``sanf_batch_size`` histogram of ``/metrics``, this phase's delta). The server's RSS, anonymous RSS, PSS and
   USS (``/proc/PID/status``, ``/proc/PID/smaps_rollup``) after the warm-up and after each phase: the growth from
   phase 1 to phase 2 is the leak check. Then SIGTERM, and the exit status of the graceful shutdown.
4. ``sanf score --run RUN IMAGES --out x.csv --device cpu``, a whole process (start-up, model load, decoding,
   scoring, CSV): wall time and images/s. Also on the same images twice (hard links under another folder, so no
   path repeats): ``N / (t(2N) - t(N))`` is its throughput without start-up and model load. And once with
   ``--maps DIR`` (the server always computes maps for a run with maps; ``sanf score`` only with ``--maps``, and
   then also writes an overlay PNG and a ``.npy`` per image). The runs alternate ``--repeats`` times; the minimum
   of each is reported.
5. Correctness: the served score of every image (the first answer per image during phase 1, scored under load in
   micro-batches; a sequential request for any image the load did not reach) and of the warm-up's several-image
   requests (answered in request order) against the ``sanf score`` CSV: largest relative difference (must be <=
   ``--rtol``, default 1e-4) and decision mismatches (must be none), else the script fails after its report.

The load clients share the machine with the server (same cores): on a small machine they take some of its CPU.

    python benchmarks/serve.py --markdown benchmarks/serve.md
    python benchmarks/serve.py --run runs/bottle --images data/bottle/test --clients 8 --seconds 30

``--markdown FILE`` replaces this run's section (keyed by its title) in FILE, or adds it; ``--clean`` deletes
``--work`` at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_table beside it, also when loaded by path
from bench_table import Runner, upsert_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ZIP = SHARED / "data" / "loco-juice-bottle.zip"
CATEGORY = "juice_bottle"
NORMAL = "good"
MAX_SECONDS = 120
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------------------------- preparation
def unpack(dest: Path, n_train: int, n_test: int) -> Path:
    """The subset of the LOCO juice_bottle zip in MVTec layout under ``dest``; returns the data root."""
    root = dest / "data"
    marker = root / f".subset-{n_train}-{n_test}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    with zipfile.ZipFile(ZIP) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        train = [n for n in names if n.startswith(f"{CATEGORY}/train/{NORMAL}/")][:n_train]
        good = [n for n in names if n.startswith(f"{CATEGORY}/test/{NORMAL}/")]
        bad = [n for n in names if n.startswith(f"{CATEGORY}/test/") and f"/test/{NORMAL}/" not in n]
        k_good = n_test // 2
        test = _spread(good, k_good) + _spread(bad, n_test - k_good)
        masks = []
        for n in test:
            parts = n.split("/")
            if parts[2] != NORMAL:
                m = f"{CATEGORY}/ground_truth/{parts[2]}/{Path(parts[3]).stem}_mask.png"
                if m in zf.NameToInfo:
                    masks.append(m)
        for n in train + test + masks:
            zf.extract(n, root)
    marker.touch()
    return root


def _spread(names: list[str], k: int) -> list[str]:
    if k >= len(names):
        return names
    return [names[int(i * len(names) / k)] for i in range(k)]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXT)


def doubled(images: list[Path], base: Path, dest: Path) -> Path:
    """``dest/{a,b}/<relative path>``: every image twice under distinct paths (hard links, else copies)."""
    if dest.exists() and len(list_images(dest)) == 2 * len(images):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    for half in ("a", "b"):
        for p in images:
            q = dest / half / p.relative_to(base)
            q.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, q)
            except OSError:
                shutil.copy2(p, q)
    return dest


# ------------------------------------------------------------------------------------------------- the server
class Server:
    """``sanf serve`` as a subprocess: stdout read by a thread (the ``serving ... on URL`` line), stderr (one line
    per request) into a log file."""

    def __init__(self, args: list[str], log: Path, timeout: float = 600.0):
        self.cmd = [sys.executable, "-m", "sanf_pipeline", "serve", *map(str, args)]
        self.shown = "sanf serve " + " ".join(map(str, args))
        print(f"+ {self.shown}", flush=True)
        self.log_path = log
        self._err = log.open("w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._err, text=True, cwd=REPO)
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.match(r"serving .* on (http://\S+)$", line.strip())
                if m and self.url is None:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.kill()
            raise SystemExit(f"sanf serve did not get ready (rc {self.proc.poll()}):\n{self._tail()}")
        status, _ = get(self.url + "/readyz")
        if status != 200:
            self.kill()
            raise SystemExit(f"/readyz answered {status} after the ready line:\n{self._tail()}")
        self.ready_s = time.perf_counter() - t0
        self.host_port = self.url.split("://", 1)[1]

    def _tail(self) -> str:
        self._err.flush()
        return "\n".join(self.lines[-10:] + self.log_path.read_text().splitlines()[-20:])

    def memory(self) -> dict:
        """RSS, peak RSS, anonymous RSS and (where readable) PSS and USS (private pages) of the server process, MiB."""
        out = {}
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        for key, name in (("VmRSS", "rss"), ("VmHWM", "hwm"), ("RssAnon", "anon")):
            m = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
            out[name] = int(m.group(1)) / 1024 if m else None
        try:
            rollup = Path(f"/proc/{self.proc.pid}/smaps_rollup").read_text()
        except OSError:
            rollup = ""
        kb = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", rollup, re.M)}
        out["pss"] = kb["Pss"] / 1024 if "Pss" in kb else None
        out["uss"] = (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024 if "Private_Dirty" in kb else None
        return out

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: requests in flight finish), then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.returncode
        self._err.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def multipart(*files: tuple[str, bytes, str]) -> tuple[bytes, str]:
    """A ``files`` part per (label, bytes, content type): the body and its Content-Type."""
    boundary = "sanfbench" + os.urandom(8).hex()
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{label}\"\r\n"
                    f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n" for label, data, ctype in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def content_type(path: Path) -> str:
    ext = path.suffix.lower()
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(ext, "application/octet-stream")


def metrics(url: str) -> dict:
    """The counters this benchmark reads from /metrics: batch-size buckets (cumulative), sum, count; images."""
    status, body = get(url + "/metrics")
    if status != 200:
        raise SystemExit(f"/metrics answered {status}")
    out = {"buckets": {}, "sum": 0.0, "count": 0.0, "images": 0.0}
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r'sanf_batch_size_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            out["buckets"][m.group(1)] = float(m.group(2))
        elif line.startswith("sanf_batch_size_sum "):
            out["sum"] = float(line.split()[1])
        elif line.startswith("sanf_batch_size_count "):
            out["count"] = float(line.split()[1])
        elif line.startswith("sanf_images_total "):
            out["images"] = float(line.split()[1])
    return out


def batch_delta(before: dict, after: dict) -> dict:
    """One phase's batch sizes: count per histogram bin (non-cumulative), batches, mean size."""
    les = sorted(after["buckets"], key=lambda s: math.inf if s == "+Inf" else float(s))
    cum = [after["buckets"][le] - before["buckets"].get(le, 0.0) for le in les]
    bins, prev, lo = {}, 0.0, 0
    for le, c in zip(les, cum, strict=True):
        hi = "inf" if le == "+Inf" else str(int(float(le)))
        if c - prev:
            bins[hi if str(lo + 1) == hi else f"{lo + 1}-{hi}"] = int(round(c - prev))
        prev, lo = c, (0 if le == "+Inf" else int(float(le)))
    n = after["count"] - before["count"]
    return {"bins": bins, "batches": int(n), "mean": (after["sum"] - before["sum"]) / n if n else float("nan"),
            "images": int(after["images"] - before["images"])}


# ------------------------------------------------------------------------------------------------- the load
class Request:
    def __init__(self, host_port: str):
        self.host_port = host_port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, ctype: str) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host_port, timeout=300)
        try:
            self.conn.request("POST", "/v1/score", body=body, headers={"Content-Type": ctype})
            r = self.conn.getresponse()
            data = r.read()
            if r.getheader("connection", "").lower() == "close":
                self.close()
            return r.status, data
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def load(host_port: str, bodies: list[tuple[str, bytes, str]], clients: int, seconds: float | None,
         requests_each: int | None = None, keep_first: dict | None = None) -> dict:
    """``clients`` threads POSTing one image per request until ``seconds`` have passed (or ``requests_each`` each);
    ``keep_first``: label -> the first 200 body for that image (parsed later, off the clock)."""
    results: list[tuple[float, int, str]] = []  # (latency s, status or 0 for a connection failure, error text)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    t_end = [0.0]

    def client(k: int):
        req = Request(host_port)
        i = k  # client k sends images k, k + clients, ...: together they go through the images in order
        done = 0
        mine = []
        start.wait()
        try:
            while True:
                if requests_each is not None and done >= requests_each:
                    break
                if seconds is not None and time.perf_counter() >= t_end[0]:
                    break
                label, body, ctype = bodies[i % len(bodies)]
                t = time.perf_counter()
                try:
                    status, data = req.post(body, ctype)
                    err = "" if status == 200 else data[:200].decode(errors="replace")
                except (OSError, http.client.HTTPException) as exc:
                    status, data, err = 0, b"", f"{type(exc).__name__}: {exc}"
                mine.append((time.perf_counter() - t, status, err))
                if keep_first is not None and status == 200:
                    with lock:
                        keep_first.setdefault(label, data)
                i += clients
                done += 1
        finally:
            req.close()
            with lock:
                results.extend(mine)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    t_end[0] = t0 + (seconds or 0.0)
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ok = sum(1 for r in results if r[1] == 200)
    errors = [r for r in results if r[1] != 200]
    return {"requests": len(results), "ok": ok, "errors": len(errors), "error_examples": [e[1:] for e in errors[:5]],
            "wall": wall, "rate": ok / wall if wall else float("nan"), "p50": _q(lat, 0.5), "p90": _q(lat, 0.9),
            "p99": _q(lat, 0.99), "max": lat[-1] if lat else float("nan"),
            "mean": sum(lat) / len(lat) if lat else float("nan")}


def _q(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


# ------------------------------------------------------------------------------------------------- sanf score
def read_csv(path: Path) -> dict[str, tuple[float, bool]]:
    import csv

    with path.open() as f:
        return {str(Path(r["path"]).resolve()): (float(r["score"]), r["anomalous"] == "1") for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------- report
def _mib(x) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _dmib(a, b) -> str:
    return "n/a" if a is None or b is None else f"{b - a:+.1f}"


def _ms(x: float) -> str:
    return f"{x * 1000:.0f}"


HEADER = """# `sanf serve` under load (throughput, latency, batching, memory) vs `sanf score`

Produced by `benchmarks/serve.py` (its docstring: the steps, the options); one section per configuration, each with
the exact command. Load: concurrent clients (threads on keep-alive `http.client` connections, one image per
request, on the same machine as the server) for a fixed time, two identical phases after a warm-up. Batch sizes
from the server's `/metrics`; memory of the server process from `/proc`. `sanf score` runs are whole processes
(start-up and model load included) unless the row says otherwise.

Reading the batch sizes: the batcher's worker, once free, takes the images waiting and what arrives within
`--batch-window-ms`. A client's next image comes only after its previous answer was finished (the map at the
image's size, a PNG) and sent, which on a busy CPU takes longer than the default 5 ms window; so a few clients
settle into groups that alternate (4 clients: batches of 2 and 2, or 1 and 3; each group's images arrive while
the other group's batch is scored), and batches stay smaller than the number of clients. A longer window trades
latency for larger batches.
"""


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="an existing run folder (with --images) instead of preparing one")
    p.add_argument("--images", type=Path, help="with --run: the folder of images to score (recursive)")
    p.add_argument("--train", type=int, default=60, help="train/good images to fit on [default: 60]")
    p.add_argument("--test", type=int, default=64, help="test images (half good, half anomalous) [default: 64]")
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default=str(SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"),
                   help="backbone weights file [default: the shared DINOv2 ViT-S/14 file]")
    p.add_argument("--layer", default="8")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--clients", type=int, default=4, help="concurrent clients [default: 4]")
    p.add_argument("--seconds", type=float, default=20.0, help=f"per load phase [default: 20; at most {MAX_SECONDS}]")
    p.add_argument("--max-batch", type=int, help="passed to sanf serve [default: its own, 16]")
    p.add_argument("--batch-window-ms", type=float, help="passed to sanf serve [default: its own, 5]")
    p.add_argument("--repeats", type=int, default=2, help="alternated `sanf score` rounds (min reported) [default: 2]")
    p.add_argument("--rtol", type=float, default=1e-4, help="served vs `sanf score` scores [default: 1e-4]")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "serve",
                   help="data, cache, run, logs [default: benchmarks/.work/serve]")
    p.add_argument("--title", help="section title [default: from the run and the load settings]")
    p.add_argument("--markdown", type=Path, help="replace (or add) this run's section in this file")
    p.add_argument("--clean", action="store_true", help="delete --work at the end")
    args = p.parse_args(argv)
    if (args.run is None) != (args.images is None):
        p.error("--run and --images go together")
    if not 0 < args.seconds <= MAX_SECONDS:
        p.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if args.clients < 1:
        p.error("--clients must be at least 1")
    t_start = time.perf_counter()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sanf = Runner(work / "commands.log", cwd=REPO)
    prep_file = work / "timings.json"  # the preparation's seconds, kept for a rerun that re-uses it
    prep = json.loads(prep_file.read_text()) if args.run is None and prep_file.exists() else {}
    ran = set()

    # 1. the run
    if args.run is None:
        root = unpack(work, args.train, args.test)
        cache, run = work / "cache", work / "run"
        if not (cache / "sanf.json").exists():
            ran.add("extract")
            prep["extract"] = sanf("extract", "--dataset", "mvtec", "--category", CATEGORY, "--data-root", root,
                                   "--backbone", args.backbone, "--weights", args.weights, "--layer", args.layer,
                                   "--image-size", args.image_size, "--cache", cache, "--device", "cpu", "--quiet",
                                   "--overwrite")
        if not (run / "metrics.json").exists():
            ran.add("baseline")
            prep["baseline"] = sanf("baseline", "--cache", cache, "--normal-class", NORMAL, "--method", "patch-knn",
                                    "--out", run, "--device", "cpu", "--overwrite", "--quiet")
        prep_file.write_text(json.dumps(prep))
        images_dir = root / CATEGORY / "test"
        weights = ["--weights", args.weights]
    else:
        run, images_dir, weights = args.run.resolve(), args.images.resolve(), []
    images = list_images(images_dir)
    if not images:
        raise SystemExit(f"no images under {images_dir}")
    n = len(images)
    config = json.loads((run / "config.json").read_text())
    labels = {p: f"{i:04d}_{p.name}" for i, p in enumerate(images)}  # unique (the server keeps the last component)
    raw = [(labels[p], p.read_bytes(), content_type(p)) for p in images]
    bodies = [(r[0], *multipart(r)) for r in raw]

    # 2.-3. the server under load
    serve_args = ["--run", run, "--port", "0", "--device", "cpu", *weights]
    if args.max_batch is not None:
        serve_args += ["--max-batch", args.max_batch]
    if args.batch_window_ms is not None:
        serve_args += ["--batch-window-ms", args.batch_window_ms]
    server = Server(serve_args, work / "serve.log")
    try:
        _, info = get(server.url + "/v1/model")
        info = json.loads(info)
        # every batch size the load can produce, once (a request of k images is one batch of k when nothing else
        # waits): first-seen tensor shapes and buffers are allocated here, not counted as growth under load
        shapes, multi = min(args.clients, int((info.get("batch") or {}).get("max_batch") or args.clients)), []
        for k in range(1, shapes + 1):
            part = [raw[(k * (k - 1) // 2 + j) % n] for j in range(k)]
            status, data = Request(server.host_port).post(*multipart(*part))
            if status != 200:
                raise SystemExit(f"warm-up request of {k} images: {status} {data[:200]!r}")
            multi.append(([r[0] for r in part], data))
        warm = load(server.host_port, bodies, args.clients, None, requests_each=2)
        if warm["errors"]:
            raise SystemExit(f"warm-up: {warm['errors']} errors, e.g. {warm['error_examples']}")
        mem = {"warm": server.memory()}
        load_avg = [os.getloadavg()[0]]
        phases, first = [], {}
        for k in (1, 2):
            m0 = metrics(server.url)
            print(f"load phase {k}: {args.clients} clients x {args.seconds:g} s", flush=True)
            ph = load(server.host_port, bodies, args.clients, args.seconds, keep_first=first if k == 1 else None)
            ph["batch"] = batch_delta(m0, metrics(server.url))
            mem[f"phase{k}"] = server.memory()
            load_avg.append(os.getloadavg()[0])
            phases.append(ph)
            print(f"  {ph['requests']} requests, {ph['rate']:.2f} img/s, p50 {_ms(ph['p50'])} ms, p99 "
                  f"{_ms(ph['p99'])} ms, {ph['errors']} errors, mean batch {ph['batch']['mean']:.2f}, RSS "
                  f"{_mib(mem[f'phase{k}']['rss'])} MiB", flush=True)
            if ph["errors"]:
                raise SystemExit(f"load phase {k}: {ph['errors']} of {ph['requests']} requests failed, e.g. "
                                 f"{ph['error_examples']}")
            if ph["batch"]["images"] != ph["ok"]:
                print(f"warning: /metrics counted {ph['batch']['images']} images, the clients {ph['ok']}",
                      file=sys.stderr)
        in_load = len(first)
        for label, body, ctype in bodies:  # images the load did not reach: one sequential request each
            if label not in first:
                status, data = Request(server.host_port).post(body, ctype)
                if status != 200:
                    raise SystemExit(f"{label}: {status} {data[:200]!r}")
                first[label] = data
    finally:
        rc = server.stop()
    if rc != 0:
        raise SystemExit(f"sanf serve exited {rc} on SIGTERM (expected 0):\n{server._tail()}")
    served = {}
    for label, data in first.items():
        (res,) = json.loads(data)["results"]
        if res["filename"] != label:
            raise SystemExit(f"answer for {label} names {res['filename']}")
        served[label] = (float(res["score"]), bool(res["anomalous"]), res.get("map_png") is not None)

    # 4. sanf score, whole processes
    twice = doubled(images, images_dir, work / "score-2x")
    csv1, csv2, csvm, maps_dir = work / "score.csv", work / "score-2x.csv", work / "score-maps.csv", work / "maps"
    base = ["score", "--run", run, "--device", "cpu", "--quiet", *weights]
    t1, t2, tm = [], [], []
    for _ in range(args.repeats):
        for f in (csv1, csv2, csvm):
            f.unlink(missing_ok=True)
        shutil.rmtree(maps_dir, ignore_errors=True)
        t1.append(sanf(*base, images_dir, "--out", csv1))
        t2.append(sanf(*base, twice, "--out", csv2))
        if info.get("maps"):
            tm.append(sanf(*base, images_dir, "--out", csvm, "--maps", maps_dir))
    want = read_csv(csv1)
    if len(want) != n or len(read_csv(csv2)) != 2 * n:
        raise SystemExit(f"sanf score scored {len(want)} of {n} images (2x: {len(read_csv(csv2))} of {2 * n})")
    score_rate = n / min(t1)
    steady = n / (min(t2) - min(t1)) if min(t2) > min(t1) else float("nan")

    # 5. correctness
    worst, worst_label, flips = 0.0, None, 0
    for p in images:
        s, a, _ = served[labels[p]]
        w, wa = want[str(p.resolve())]
        rel = abs(s - w) / max(abs(w), 1e-30)
        if rel > worst:
            worst, worst_label = rel, labels[p]
        flips += int(a != wa)
    with_maps = sum(1 for v in served.values() if v[2])
    by_label = {labels[p]: want[str(p.resolve())] for p in images}
    multi_worst = 0.0
    for names, data in multi:  # the warm-up's requests of several images: their order, their scores
        got = json.loads(data)["results"]
        if [g["filename"] for g in got] != names:
            raise SystemExit(f"a request of {names} was answered for {[g['filename'] for g in got]}")
        for g in got:
            w, wa = by_label[g["filename"]]
            multi_worst = max(multi_worst, abs(float(g["score"]) - w) / max(abs(w), 1e-30))
            flips += int(bool(g["anomalous"]) != wa)

    # the report
    served_rate = min(ph["rate"] for ph in phases)
    served_best = max(ph["rate"] for ph in phases)
    mb = info.get("batch") or {}
    bb = (config.get("cache") or {}).get("backbone") or {}
    method = config.get("method") or info.get("method")
    title = args.title or (f"{Path(str(run)).name if args.run else CATEGORY} {method}, "
                           f"{bb.get('arch') or bb.get('name') or args.backbone} "
                           f"{info.get('input_size', [args.image_size])[-1]} px: {args.clients} clients, "
                           f"max-batch {mb.get('max_batch')}, window {mb.get('window_ms'):g} ms")
    cmd = "python benchmarks/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import torch

    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (another benchmark may "
               f"have been running), no GPU (`--device cpu`), torch {torch.__version__} "
               f"({torch.get_num_threads()} threads by default in each process); the load clients run on the same "
               f"cores as the server. 1-minute load average before / after phase 1 / after phase 2: "
               f"{' / '.join(f'{x:.1f}' for x in load_avg)} (2.0 = both cores busy).")
    data = (f"{n} test images from `{images_dir.relative_to(REPO) if images_dir.is_relative_to(REPO) else images_dir}`"
            + (f" ({args.test // 2} `good` + {n - args.test // 2} `logical_anomalies`, 512x256 JPEG, "
               f"~25 kB each); run: `sanf baseline --method patch-knn` (maps on) on {args.train} `train/good` images, "
               f"{args.backbone} layer {args.layer} at {args.image_size} px" if args.run is None else f"; run `{run}`")
            + f"; score `{info.get('score')}`, maps {'on' if info.get('maps') else 'off'}.")
    load_rows = ["| | warm-up | phase 1 | phase 2 |", "|---|---|---|---|",
                 f"| requests (1 image each) | {warm['requests']} | {phases[0]['requests']} | "
                 f"{phases[1]['requests']} |",
                 f"| errors | {warm['errors']} | {phases[0]['errors']} | {phases[1]['errors']} |",
                 f"| wall s | {warm['wall']:.1f} | {phases[0]['wall']:.1f} | {phases[1]['wall']:.1f} |",
                 f"| throughput, images/s | {warm['rate']:.2f} | **{phases[0]['rate']:.2f}** | "
                 f"**{phases[1]['rate']:.2f}** |",
                 *(f"| latency {k}, ms | {_ms(warm[k])} | {_ms(phases[0][k])} | {_ms(phases[1][k])} |"
                   for k in ("p50", "p90", "p99", "max", "mean")),
                 f"| model calls (batches) | | {phases[0]['batch']['batches']} | {phases[1]['batch']['batches']} |",
                 f"| mean batch size | | {phases[0]['batch']['mean']:.2f} | {phases[1]['batch']['mean']:.2f} |",
                 "| batch sizes (histogram bins: count) | | "
                 + " | ".join(", ".join(f"{k}: {v}" for k, v in ph["batch"]["bins"].items()) for ph in phases)
                 + " |",
                 f"| server RSS after, MiB | {_mib(mem['warm']['rss'])} | {_mib(mem['phase1']['rss'])} | "
                 f"{_mib(mem['phase2']['rss'])} |",
                 *(f"| server {name} after, MiB | {_mib(mem['warm'][k])} | {_mib(mem['phase1'][k])} | "
                   f"{_mib(mem['phase2'][k])} |"
                   for k, name in (("anon", "anonymous RSS"), ("pss", "PSS"), ("uss", "USS (private)")))]
    cmp_rows = ["| what | wall s | images/s | served / this |", "|---|---|---|---|",
                f"| `sanf serve`, {args.clients} clients (slower / faster phase) | {args.seconds:g} per phase | "
                f"{served_rate:.2f} / {served_best:.2f} | 1 |",
                f"| `sanf score` of the {n} images, whole process (start-up + model load + scoring + CSV) | "
                f"{min(t1):.1f} | {score_rate:.2f} | **{served_rate / score_rate:.2f}** |",
                f"| `sanf score` of the {n} images twice ({2 * n} paths), whole process | {min(t2):.1f} | "
                f"{2 * n / min(t2):.2f} | {served_rate / (2 * n / min(t2)):.2f} |",
                f"| `sanf score` without start-up: {n} / (t({2 * n}) - t({n})) | {min(t2) - min(t1):.1f} | "
                + (f"{steady:.2f} | **{served_rate / steady:.2f}** |" if math.isfinite(steady) else
                   "n/a (t(2N) <= t(N): noise) | n/a |")]
    if tm:
        cmp_rows.append(f"| `sanf score --maps DIR` of the {n} images, whole process (also writes an overlay PNG and "
                        f"a .npy per image) | {min(tm):.1f} | {n / min(tm):.2f} | {served_rate / (n / min(tm)):.2f} |")
    startup = min(t1) - n / steady if math.isfinite(steady) else float("nan")
    lines = [f"## {title}", "", f"Command: `{cmd}`", "", f"Machine: {machine}", "", f"Data: {data}", "",
             f"Server: `{server.shown.replace(str(REPO) + '/', '')}`; ready (stdout line + `/readyz` 200) "
             f"{server.ready_s:.1f} s after the process started; exit status after SIGTERM {rc}.", "",
             f"**Load** ({args.clients} clients, each one image per request, {args.seconds:g} s per phase; warm-up: "
             f"one request each of 1 to {shapes} images in turn (every batch size once), then {2 * args.clients} "
             f"concurrent one-image requests, the column below; latency = the client's request-to-answer time, "
             f"nearest rank over the phase's requests):", "", *load_rows, "",
             "Memory growth phase 1 -> phase 2 (the leak check) / warm-up -> phase 2: "
             + "; ".join(f"{name} {_dmib(mem['phase1'][k], mem['phase2'][k])} / "
                         f"{_dmib(mem['warm'][k], mem['phase2'][k])} MiB"
                         for k, name in (("rss", "RSS"), ("anon", "anonymous RSS"), ("uss", "USS"), ("pss", "PSS")))
             + f" (peak RSS over the server's life {_mib(mem['phase2']['hwm'])} MiB). Anonymous RSS (the "
             f"heap, tensors, buffers) is the server's own and the leak measure; PSS and USS also count file-backed "
             f"pages (torch's libraries) by how many processes map them, so they move when other processes mapping the "
             f"same files (here: other benchmarks' torch processes) start or exit.", "",
             f"**vs `sanf score`** (same images, `--device cpu`, default batch 32 and decoding workers; min of "
             f"{args.repeats} alternated round{'s' if args.repeats > 1 else ''}; served: the slower phase; the server "
             f"computes and PNG-encodes a map per image, `sanf score` without `--maps` does not):", "", *cmp_rows, "",
             "`sanf score`'s whole-process time includes Python start-up, imports and the model load ("
             + (f"about {startup:.0f} s here, estimated as t({n}) - {n} / the rate without start-up"
                if math.isfinite(startup) else "not estimated: the differencing was lost in noise")
             + f"; the server's comparable start-up is its {server.ready_s:.0f} s to ready); a served model pays "
             f"that once at server start.", "",
             f"**Correctness:** served scores of all {n} images (the first answer per image during phase 1 for "
             f"{min(in_load, n)} of them, scored under load in the micro-batches above; one sequential request for "
             f"the other {n - min(in_load, n)}) vs the `sanf score` CSV: largest relative difference {worst:.2g}"
             + (f" ({worst_label})" if worst_label else "") + f" (tolerance {args.rtol:g}); the warm-up's requests "
             f"of 1 to {shapes} images (answers in request order checked): largest relative difference "
             f"{multi_worst:.2g}; {flips} decision mismatches in all; {with_maps} of the {n} answers carried a map "
             f"PNG.", "",
             f"Total time of this invocation {time.perf_counter() - t_start:.0f} s"
             + (f" (preparation{', done by an earlier invocation' if not ran else ''}: "
                f"{', '.join(f'{k} {v:.0f} s' for k, v in prep.items())})." if prep else "."), ""]
    section = "\n".join(lines)
    (work / "section.md").write_text(section)
    print(section)
    if args.markdown:
        upsert_section(args.markdown, title, section, HEADER)
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    if not max(worst, multi_worst) <= args.rtol or flips:
        raise SystemExit(f"served scores differ from `sanf score`: largest relative difference {worst:.3g} "
                         f"({worst_label}), {flips} decision mismatches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
