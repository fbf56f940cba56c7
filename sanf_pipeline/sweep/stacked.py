"""The sweep's stacked executor (``--stack``): flow runs whose settings differ only in seed (and normal class) are
trained K at a time by ``train.stack.fit_stack`` and scored against the test split in one pass by
``train.stack.score_stack``; every run folder gets the files ``jobs.flow.flow_job`` writes (``config.json``,
``model.safetensors``, ``train_log.jsonl``, then ``jobs.flow.eval_flow_job``'s results), so summaries, resume and
`sanf eval` see no difference.

What does not stack goes through the serial executor, one run after the other: baselines, and flow runs with
something to resume in their folder (an epoch checkpoint or a fitted model), so a sweep killed under the
ordinary executor continues exactly. A stack writes no epoch checkpoints: a killed stack is retrained.
Stack size: ``resolve_stack_size`` (``auto``: from the free GPU memory after the data; 1 on CPU).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import SanfError
from ..train.config import FitConfig
from .plan import RunSpec

# Fraction of the free GPU memory a stack may plan to use (the rest: allocator slack, other tensors).
MEMORY_FRACTION = 0.8


def parse_stack(value) -> int | str:
    """``--stack``: ``auto`` or a positive integer."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise SanfError(f"--stack must be auto or a positive integer, not {value!r}")
    return n


def flow_param_count(cfg: FitConfig, dim: int, patch_dim: int, num_tokens: int) -> int:
    from ..flow import SANFlow

    with torch.device("meta"):
        flow = SANFlow(**cfg.flow_kwargs(dim, patch_dim, num_tokens))
    return sum(p.numel() for p in flow.parameters())


def flow_memory_bytes(cfg: FitConfig, dim: int, patch_dim: int, num_tokens: int) -> int:
    """Device bytes one more flow in a stack needs: weights, gradient, two Adam moments and the best-epoch copy
    (5 float32 copies), plus activations of one batch kept for the backward pass (estimated generously)."""
    params = flow_param_count(cfg, dim, patch_dim, num_tokens)
    a = cfg.attn_dim or max(1, patch_dim // 2)
    per_sample = cfg.blocks * 2 * (6 * cfg.hidden + 4 * num_tokens * max(a, patch_dim // 2) + 8 * dim)
    batch = max(cfg.batch_size, cfg.eval_batch_size)
    return 5 * 4 * params + 4 * batch * per_sample * 2


def auto_stack_size(n_flows: int, per_flow_bytes: int, free_bytes: int) -> int:
    """How many flows fit in ``free_bytes`` (at least 1, at most ``n_flows``)."""
    if n_flows < 1:
        return 1
    fit = int(free_bytes * MEMORY_FRACTION // max(1, per_flow_bytes))
    return max(1, min(n_flows, fit))


def resolve_stack_size(stack, n_flows: int, device: torch.device, per_flow_bytes: int,
                       data_bytes: int = 0) -> int:
    """``--stack auto|N`` -> a stack size. ``auto``: on a GPU from its free memory (after the data); on CPU 1
    (a stacked CPU sweep measured slower than the process pool, ``benchmarks/protocol.md``)."""
    stack = parse_stack(stack)
    if stack != "auto":
        return max(1, min(int(stack), max(1, n_flows)))
    if device.type != "cuda":
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    return auto_stack_size(n_flows, per_flow_bytes, max(0, free - data_bytes))


def plan_stacks(keys: Sequence[str], sizes: Sequence[int], stack_size: int) -> list[list[int]]:
    """Group item indices into stacks: same key and same training-set size, at most ``stack_size`` each, in the
    order given (so flows of one class stay together and each class's block is needed by few stacks)."""
    groups: dict[tuple, list[int]] = {}
    for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
        groups.setdefault((k, int(n)), []).append(i)
    out = []
    for members in groups.values():
        for s in range(0, len(members), max(1, stack_size)):
            out.append(members[s:s + stack_size])
    return out


def stackable(spec: RunSpec, runs_dir: Path) -> bool:
    from ..store.run_folder import CHECKPOINT_FILE, MODEL_FILE

    rd = runs_dir / spec.run_id
    if not spec.is_flow or (rd / CHECKPOINT_FILE).exists() or (rd / MODEL_FILE).exists():
        return False
    # input noise and min_epoch_steps included: the stacked loop is fit_flow's (train.run_epoch, tests/test_stack.py)
    return True


def stack_size_for(todo: list[RunSpec], ctx: dict, cache, stack) -> int:
    """The stack size ``--stack`` gives for the stackable runs of ``todo`` (1: no stacking)."""
    from ..device import resolve_device

    flows = [s for s in todo if stackable(s, Path(ctx["runs_dir"]))]
    if len(flows) < 2:
        return 1
    cfg = flows[0].fit_config(ctx["device"])
    device = resolve_device(cfg.device)
    tokens = cache.num_tokens // (cfg.token_pool ** 2)
    counts = cache.split("train").class_counts()
    classes = {s.class_index for s in flows}
    # the training blocks of every class a stack may span, and the test split, stay on the device
    rows = int(sum(counts[c] for c in classes)) + cache.split("test").n_valid
    data_bytes = rows * (tokens * cache.patch_dim + cache.dim) * 4
    return resolve_stack_size(stack, len(flows), device, flow_memory_bytes(cfg, cache.dim, cache.patch_dim, tokens),
                              data_bytes)


def run_stacked(todo: list[RunSpec], ctx: dict, data, stack_size: int, threads: int, on_done) -> None:
    from ..jobs.data import TestData, TrainData
    from ..jobs.flow import eval_flow_job, fit_settings, flow_score_kind
    from ..jobs.parts import attach_patch_part
    from ..models import FlowModel, resolve_score
    from ..store.atomic import now
    from ..store.run_folder import finish_run, start_run_config
    from ..train.stack import StackMember, fit_stack, score_stack, stack_key
    from .executors import (
        _clean_tmp,
        _drop_model,
        _model_extras,
        _run_serial,
        _sweep_extras,
        _torch_threads,
        patch_parts,
    )

    runs_dir = Path(ctx["runs_dir"])
    flows = [s for s in todo if stackable(s, runs_dir)]
    rest = [s for s in todo if not stackable(s, runs_dir)]
    if rest:
        _run_serial(rest, ctx, data, threads, on_done)
    if not flows:
        return
    flows.sort(key=lambda s: s.class_index)  # stacks span few classes, each block is read once
    counts = data.cache.split("train").class_counts()
    cfgs = [s.fit_config(ctx["device"]) for s in flows]
    groups = plan_stacks([stack_key(c) for c in cfgs], [int(counts[s.class_index]) for s in flows], stack_size)
    test = data.test()
    test_data = TestData.from_arrays(test["cls"], test.get("patch"), test["labels"], test["sample_ids"],
                                     num_tokens=ctx["num_tokens"], fingerprint=ctx["fingerprint"],
                                     cache_path=ctx["cache_path"], identity=ctx["cache_identity"])
    blocks: dict[tuple[int, bool], dict] = {}
    with _torch_threads(threads):
        for group in groups:
            t0 = time.perf_counter()
            specs = [flows[i] for i in group]
            cfg0 = cfgs[group[0]]
            need = {(s.class_index, cfg0.needs_patch) for s in specs}
            for key in [k for k in blocks if k not in need]:
                del blocks[key]  # drop blocks no longer needed before reading new ones
            for key in sorted(need):
                if key not in blocks:
                    blocks[key] = data.train(*key)
            members, configs = [], []
            for s, i in zip(specs, group, strict=True):
                rd = runs_dir / s.run_id
                rd.mkdir(parents=True, exist_ok=True)
                _clean_tmp(rd)
                b = blocks[(s.class_index, cfg0.needs_patch)]
                configs.append(start_run_config(
                    rd, cfgs[i], fit_settings(cfgs[i], ctx["fingerprint"], s.class_index), class_index=s.class_index,
                    class_name=s.class_name, n_train=len(b["cls"]), cache_identity=ctx["cache_identity"],
                    created=now(), extra={"sweep": _sweep_extras(s, ctx), **_model_extras(ctx)}))
                members.append(StackMember(cfgs[i], b["cls"], b.get("patch") if cfgs[i].flow_needs_patch else None,
                                           data_key=s.class_index))
            results = fit_stack(members, description=f"stack of {len(members)}")
            t_fit = time.perf_counter() - t0
            done = []
            for s, i, config, r in zip(specs, group, configs, results, strict=True):
                if isinstance(r, Exception):
                    on_done(s, {"run_id": s.run_id, "error": str(r), "seconds": t_fit / len(specs),
                                "pid": os.getpid(), "stack": len(specs)})
                else:
                    b = blocks[(s.class_index, cfg0.needs_patch)]
                    r.patch_part_key = attach_patch_part(
                        r, cfgs[i], TrainData(b["cls"], b.get("patch"), s.class_index, s.class_name),
                        ctx["fingerprint"], patch_parts(ctx))
                    finish_run(runs_dir / s.run_id, config, r)
                    done.append((s, config, r, cfgs[i]))
            if not done:
                continue
            t1 = time.perf_counter()
            kind = flow_score_kind(resolve_score(ctx["score"], done[0][1]))
            scores = score_stack([r.model for *_, r, _ in done], [r.normalizer for *_, r, _ in done], test["cls"],
                                 test.get("patch") if cfg0.flow_needs_patch else None, kind,
                                 batch_size=cfg0.eval_batch_size, device=cfg0.device)
            t_score = (time.perf_counter() - t1) / len(done)
            for k, (s, config, r, cfg) in enumerate(done):
                t2 = time.perf_counter()
                info = _sweep_extras(s, ctx)
                parts, key = patch_parts(ctx), r.patch_part_key
                res = eval_flow_job(runs_dir / s.run_id, FlowModel(r.normalizer, r.model), r.patch_score, config,
                                    test_data, score=ctx["score"], plots=ctx["plots"], train_log=r.log,
                                    flow_scores=scores[k], patch_scores=parts.test_scores(key) if key else None,
                                    extra_metrics={"sweep_run_id": s.run_id,
                                                   "sweep": {**info, "settings": cfg.settings()}})
                if key and "patch" in res.parts:
                    parts.add_test(key, res.parts["patch"])
                _drop_model(runs_dir / s.run_id, ctx)
                write = time.perf_counter() - t2
                on_done(s, {"run_id": s.run_id, "auroc": res.metrics["auroc"], "fit_s": t_fit / len(specs),
                            "score_write_s": t_score + write, "reused_model": False,
                            "train_samples_seen": r.n_train * r.epochs_run, "n_test": len(scores[k]),
                            "stack": len(specs), "seconds": t_fit / len(specs) + t_score + write, "pid": os.getpid()})
