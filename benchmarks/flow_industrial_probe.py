"""Why the flow does not learn from the patch tokens on inspection data, and what fixes it (issue 12 probe).

One MVTec-layout cache per call (normal class ``good`` by default): fits flow variants (``--config``) over seeds and
the class-token baselines (knn, knn-l2, gaussian) plus a probe patch-kNN, and appends one JSON line per result to
``--out``. ``--table`` renders the markdown of one or more such files. Nothing here looks at the test labels
except to compute the AUROC that is reported; every setting is fixed before the runs.

Flow scores:
- class-token flow (``main_input=semantic``): NLL of the class token (the paper's score);
- patch flow (``main_input=spatial``, paper Table 4): per-token NLL of the patch tokens given the class token,
  aggregated per image as ``sum`` (the image's joint patch likelihood) or ``max`` (its least likely token);
- ``joint`` for a (class flow, patch flow) pair of the same seed: ``z(cls NLL) + z(max token NLL)``, each
  standardised by its mean/std over the held-out *normal training* rows (the early-stopping slice), so neither
  term's scale is chosen on test data.

    python benchmarks/flow_industrial_probe.py --cache CACHE --out runs/probe/X.jsonl \\
        --config 'cls:{}' --config 'patch:{"main_input":"spatial","hidden":128}' --seeds 0 \\
        --baselines knn,knn-l2,gaussian,patch-knn
    python benchmarks/flow_industrial_probe.py --table runs/probe/*.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _auroc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def _val_index(n: int, cfg) -> np.ndarray:
    # the same held-out slice fit_flow uses (train.py: default_rng(seed).permutation, first n_val rows)
    n_val = max(1, int(round(cfg.val_fraction * n)))
    return np.sort(np.random.default_rng(cfg.seed).permutation(n)[:n_val])


def _token_ll(flow, normalizer, cls, patch, batch=64) -> np.ndarray:
    x, p = normalizer.transform(cls, patch)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(flow.token_log_likelihood(torch.from_numpy(x[i:i + batch]),
                                                 torch.from_numpy(p[i:i + batch])).double().numpy())
    return np.concatenate(out)


def run_flow(name, overrides, seed, tr_cls, tr_patch, te_cls, te_patch) -> dict:
    from sanf_pipeline.flow.score import score_flow
    from sanf_pipeline.train.config import FitConfig
    from sanf_pipeline.train.fit import fit_flow

    cfg = FitConfig(**{**overrides, "seed": seed})
    t0 = time.perf_counter()
    def tell(epoch, row, _model):
        print(f"  {name} seed {seed} epoch {epoch}: train {row['train_loss']:.4f} val {row['val_nll']:.4f} "
              f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)

    res = fit_flow(tr_cls, tr_patch if cfg.needs_patch else None, cfg, callback=tell)
    fit_s = time.perf_counter() - t0
    va = _val_index(len(tr_cls), cfg)
    row = {"config": name, "overrides": overrides, "seed": seed, "best_epoch": res.best_epoch,
           "epochs_run": res.epochs_run, "steps_per_epoch": max(-(-res.n_train // cfg.batch_size),
                                                                cfg.min_epoch_steps),
           "fit_s": round(fit_s, 1), "initial_val_nll": res.initial_val_nll,
           "val_nll": [r["val_nll"] for r in res.log]}
    if cfg.main_input == "spatial":
        te = -_token_ll(res.model, res.normalizer, te_cls, te_patch)
        vl = -_token_ll(res.model, res.normalizer, tr_cls[va], tr_patch[va])
        scores = {"sum": (te.sum(1), vl.sum(1)), "max": (te.max(1), vl.max(1))}
    else:
        def nll(c, p):
            x, q = res.normalizer.transform(c, p if cfg.needs_patch else None)
            return score_flow(res.model, torch.from_numpy(x), None if q is None else torch.from_numpy(q))
        scores = {"nll": (nll(te_cls, te_patch), nll(tr_cls[va], tr_patch[va]))}
    row["scores"] = {k: (t.tolist(), v.tolist()) for k, (t, v) in scores.items()}
    return row


def patch_knn(tr_patch, te_patch, bank_max=16384, seed=0) -> np.ndarray:
    """Probe patch-kNN: 3x3 neighbourhood-averaged tokens, random bank, image score = max token NN distance."""
    def agg(p):
        n, t, d = p.shape
        g = int(round(t ** 0.5))
        x = torch.from_numpy(p).reshape(n, g, g, d).permute(0, 3, 1, 2)
        x = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        return x.permute(0, 2, 3, 1).reshape(n, t, d)

    bank = agg(tr_patch).reshape(-1, tr_patch.shape[2])
    if len(bank) > bank_max:
        bank = bank[torch.from_numpy(np.random.default_rng(seed).choice(len(bank), bank_max, replace=False))]
    te = agg(te_patch)
    out = np.empty(len(te))
    for i in range(len(te)):
        out[i] = torch.cdist(te[i], bank).min(dim=1).values.max().item()
    return out


def main_run(a) -> None:
    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.models import fit_score as score_baseline

    torch.set_num_threads(a.threads)
    cache = open_cache(a.cache)
    ci = cache.class_index(a.normal)
    tr_cls, tr_patch = cache.split("train").read_class(ci)
    te_cls, te_patch, labels, _ = cache.split("test").read_all()
    y = (labels != ci).astype(int)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cache": str(a.cache), "normal": a.normal,
            "n_train": len(tr_cls), "n_test": len(te_cls), "n_anomalous": int(y.sum()),
            "dim": int(tr_cls.shape[1]), "tokens": int(tr_patch.shape[1]), "labels": y.tolist()}

    def emit(row):
        row = {**meta, **row}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        short = {k: v for k, v in row.items() if k not in ("labels", "scores", "val_nll")}
        if "scores" in row:
            short["auroc"] = {k: round(_auroc(y, t), 4) for k, (t, _) in row["scores"].items()}
        print(json.dumps(short), flush=True)

    for m in [b for b in a.baselines.split(",") if b]:
        if m == "patch-knn":
            emit({"config": "patch-knn(probe)", "seed": 0,
                  "scores": {"score": (patch_knn(tr_patch, te_patch).tolist(), [])}})
        else:
            emit({"config": m, "seed": 0, "scores": {"score": (score_baseline(m, tr_cls, te_cls).tolist(), [])}})
    for spec in a.config:
        name, _, js = spec.partition(":")
        overrides = json.loads(js or "{}")
        for seed in [int(s) for s in a.seeds.split(",")]:
            emit(run_flow(name, overrides, seed, tr_cls, tr_patch, te_cls, te_patch))


def _z(t, v):
    t, v = np.asarray(t), np.asarray(v)
    return (t - v.mean()) / max(v.std(), 1e-12)


def main_table(paths, joint_pairs) -> None:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    by_cache: dict[tuple, list] = {}
    for r in rows:
        by_cache.setdefault((r["cache"], r.get("normal", "good")), []).append(r)
    for (cache, normal), rs in by_cache.items():
        y = np.asarray(rs[0]["labels"])
        print(f"\n### {Path(cache).name}, normal class {normal} (train {rs[0]['n_train']}, test {rs[0]['n_test']}, "
              f"anomalous {rs[0]['n_anomalous']}, d {rs[0]['dim']}, {rs[0]['tokens']} tokens)\n")
        print("| method | score | AUROC mean | seeds | kept epoch (of run) | fit s |\n|---|---|---|---|---|---|")
        res: dict[tuple, list] = {}
        info: dict[str, list] = {}
        for r in rs:
            for k, (t, _) in r["scores"].items():
                res.setdefault((r["config"], k), []).append(_auroc(y, t))
            info.setdefault(r["config"], []).append(r)
        for left, right in joint_pairs:  # z(cls nll) + z(max token nll), per seed, both z by held-out normals
            lrs = {r["seed"]: r for r in info.get(left, [])}
            for r in info.get(right, []):
                if r["seed"] in lrs:
                    (ct, cv), (pt, pv) = lrs[r["seed"]]["scores"]["nll"], r["scores"]["max"]
                    res.setdefault((f"{left} + {right}", "z-sum"), []).append(
                        _auroc(y, _z(ct, cv) + _z(pt, pv)))
        for (cfg, k), v in res.items():
            runs = info.get(cfg, [])
            ep = ", ".join(f"{r.get('best_epoch')}/{r.get('epochs_run')}" for r in runs if "best_epoch" in r)
            fs = ", ".join(str(r.get("fit_s")) for r in runs if r.get("fit_s") is not None)
            print(f"| {cfg} | {k} | {np.mean(v):.4f} | {' '.join(f'{x:.3f}' for x in v)} | {ep} | {fs} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache")
    ap.add_argument("--normal", default="good")
    ap.add_argument("--out", default="runs/probe/probe.jsonl")
    ap.add_argument("--config", action="append", default=[], help="NAME:JSON of FitConfig overrides")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--baselines", default="", help="comma list of knn, knn-l2, gaussian, patch-knn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", nargs="*", help="render these jsonl files")
    ap.add_argument("--joint", action="append", default=[], help="CLS_CONFIG+PATCH_CONFIG pairs to combine")
    a = ap.parse_args()
    if a.table:
        main_table(a.table, [tuple(j.split("+", 1)) for j in a.joint])
    else:
        main_run(a)


if __name__ == "__main__":
    main()
