"""A sweep before and after issue 18, in one run: wall time, patch-knn banks fitted, peak memory, and equal results.

Runs the same `run_sweep` twice on the same cache, each in a fresh interpreter: once with the package as it was at
``--old-ref`` (a git commit, unpacked with ``git archive`` into a temporary folder) and once with this working
tree. While each runs, the proportional set size (PSS: shared pages split between the processes that map them, so
the pool's shared memory counts once) of the whole process tree is sampled every 0.2 s; the peak is reported.
Results must not change: the script compares every run's AUROC and ``scores.csv`` scores between the two.

The README's example grid (fusion x clamp, flow + knn + gaussian, seeds 0,1,2) on one class of a synthetic cache of
CIFAR-10 DINOv2-S shapes (d 384, 16x16 tokens), one fixed epoch so the flows stay cheap:

    python benchmarks/sweep_parts.py --synthetic benchmarks/.work/syn --classes class0 \\
        --grid fusion=none,gap,learnable,semantic --grid clamp=2,3 --methods flow,knn,gaussian --seeds 0,1,2 \\
        --set epochs=1 --set early_stopping=false --markdown benchmarks/sweep_parts.md

Peak memory of a default 10-class sweep on a real cache (``--cache``; `sanf sweep` defaults otherwise):

    python benchmarks/sweep_parts.py --cache benchmarks/.work/cifar-dinov2 --classes all --methods flow \\
        --markdown benchmarks/sweep_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
args = json.loads(sys.argv[2])
try:
    import sanf_pipeline.jobs.parts as jobs  # the layout since issue 18
except ImportError:
    import sanf_pipeline.jobs as jobs
from sanf_pipeline.sweep import run_sweep
fits = {"n": 0}
# count patch-knn bank fits in this process and its forked workers (a file collects them)
counter = args["counter"]
for name in ("fit_patch_part",):
    if hasattr(jobs, name):
        real = getattr(jobs, name)
        def counting(*a, _real=real, **k):
            with open(counter, "a") as fh:
                fh.write("1\n")
            return _real(*a, **k)
        setattr(jobs, name, counting)
try:
    from sanf_pipeline import combined as old_combined  # before issue 18: PatchScore.fit fits every bank
    real_fit = old_combined.PatchScore.fit.__func__
    def counting_fit(cls, *a, **k):
        with open(counter, "a") as fh:
            fh.write("1\n")
        return real_fit(cls, *a, **k)
    old_combined.PatchScore.fit = classmethod(counting_fit)
except ImportError:
    pass
t = time.perf_counter()
res = run_sweep(args["cache"], args["out"], args["classes"], args["grid"] or None, args["methods"], args["seeds"],
                args["fixed"] or None, plots=False, quiet=True, workers=args["workers"], device="cpu")
print(json.dumps({"wall_s": time.perf_counter() - t, "runs": len(res.computed), "workers": res.workers}))
"""


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(code_root: Path, args: dict) -> dict:
    """Run the driver with ``code_root`` first on the path; returns its JSON line plus the peak tree PSS."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "SANF_PROGRESS_INTERVAL": "3600"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(code_root), json.dumps(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(code_root))
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss_bytes(p) for p in _tree(proc.pid)))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"sweep under {code_root} failed:\n{err[-3000:]}")
    rec = json.loads(out.strip().splitlines()[-1])
    rec["peak_pss_bytes"] = peak[0]
    counter = Path(args["counter"])
    rec["bank_fits"] = len(counter.read_text().split()) if counter.exists() else 0
    return rec


def _scores(sweep: Path) -> dict[str, tuple[float, list[float]]]:
    out = {}
    for run in sorted((sweep / "runs").iterdir()):
        m = json.loads((run / "metrics.json").read_text())
        import csv

        with open(run / "scores.csv", newline="", encoding="utf-8") as fh:
            scores = [float(r["score"]) for r in csv.DictReader(fh)]
        out[run.name] = (m["auroc"], scores)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", type=Path, help="an existing cache")
    src.add_argument("--synthetic", type=Path, help="write a synthetic cache of CIFAR-10 DINOv2-S shapes here")
    p.add_argument("--classes", default="all")
    p.add_argument("--grid", action="append", default=[])
    p.add_argument("--set", dest="fixed", action="append", default=[])
    p.add_argument("--methods", default="flow")
    p.add_argument("--seeds", default="0")
    p.add_argument("--workers", type=int, default=None, help="sweep workers [default: run_sweep's]")
    p.add_argument("--old-ref", default="a9c0e34", help="the commit before issue 18")
    p.add_argument("--new-ref", help="run 'after' from this commit instead of the working tree")
    p.add_argument("--markdown", type=Path)
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sanf-sweep-parts-", dir=REPO / "benchmarks" / ".work"
                                 if (REPO / "benchmarks" / ".work").is_dir() else None))
    try:
        cache = a.cache
        if a.synthetic:
            from sanf_pipeline.cache.synthetic import write_synthetic_cache

            cache = a.synthetic
            if not cache.exists():
                write_synthetic_cache(cache, n_classes=10, n_train=200, n_test=40, dim=384, num_tokens=256,
                                      separation=1.0, seed=0, dtype="float16")
        def unpack(ref: str, name: str) -> Path:
            root = work / name
            root.mkdir()
            tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "sanf_pipeline"], check=True,
                                 capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)
            return root

        old = unpack(a.old_ref, "old")
        new = unpack(a.new_ref, "new") if a.new_ref else REPO
        results = {}
        for name, root in (("before", old), ("after", new)):
            args = {"cache": str(Path(cache).resolve()), "out": str(work / f"sweep-{name}"), "classes": a.classes,
                    "grid": a.grid, "methods": a.methods, "seeds": a.seeds, "fixed": a.fixed, "workers": a.workers,
                    "counter": str(work / f"fits-{name}.txt")}
            print(f"running the sweep {name} issue 18 ...", file=sys.stderr, flush=True)
            results[name] = run_measured(root, args)
            print(f"  {results[name]}", file=sys.stderr, flush=True)
        before, after = _scores(work / "sweep-before"), _scores(work / "sweep-after")
        assert before.keys() == after.keys(), "the two sweeps planned different runs"
        d_auroc = max(abs(before[k][0] - after[k][0]) for k in before)
        d_score = max(max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(before[k][1], after[k][1], strict=True)),
                          default=0.0) for k in before)
        b, f = results["before"], results["after"]
        rows = [
            ("code", f"before: {a.old_ref}; after: {a.new_ref or 'working tree'}"),
            ("cache", f"{cache} ({'synthetic' if a.synthetic else 'real'})"),
            ("sweep", f"classes {a.classes}, methods {a.methods}, grid {' '.join(a.grid) or '-'}, seeds {a.seeds}, "
                      f"--set {' '.join(a.fixed) or '-'}; {b['runs']} runs, {b['workers']} worker(s)"),
            ("wall time before / after",
             f"{b['wall_s']:.1f} s / {f['wall_s']:.1f} s = **{b['wall_s'] / f['wall_s']:.2f}x**"),
            ("patch-knn banks fitted before / after", f"{b['bank_fits']} / {f['bank_fits']}"),
            ("peak PSS of the sweep's processes before / after",
             f"{b['peak_pss_bytes'] / 2**20:.0f} MiB / {f['peak_pss_bytes'] / 2**20:.0f} MiB"),
            ("max AUROC difference, max relative score difference", f"{d_auroc:.2e}, {d_score:.2e}"),
            ("machine", f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end"),
        ]
        table = "| measure | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
        print(table)
        if a.markdown:
            cmd = "python benchmarks/sweep_parts.py " + " ".join(argv if argv is not None else sys.argv[1:])
            text = f"# Sweep before and after issue 18\n\nCommand: `{cmd}`\n\n{table}"
            if a.markdown.exists():
                text = a.markdown.read_text() + "\n" + text.split("\n", 2)[2]
            a.markdown.write_text(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
