"""`sanf sweep` and `sanf report`: click commands over the ``sweep`` package (registered into the `sanf` group in cli.py
with ``cli.add_command``; the group turns a SanfError into one line and exit code 2)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import SanfError
from ..train.options import _RegistryChoice
from .options import SCORE_HELP, _scores

# FitConfig's fields minus seed and device, spelled out so that `sanf sweep --help` need not import torch;
# tests/test_usability.py checks the list against FitConfig
GRID_KEYS = ("amp", "attn_dim", "batch_size", "betas", "blocks", "checkpoint_every", "clamp", "combine",
             "early_stopping", "epochs", "eps", "eval_batch_size", "fpr", "fusion", "grad_clip", "heads", "hidden",
             "keep_initial", "lr", "main_input", "max_epochs", "min_delta", "min_epoch_steps", "noise", "normalize",
             "patch_coreset", "patch_neighbourhood", "patch_score", "patience", "spatial_channels", "token_pool",
             "val_fraction", "weight_decay")


def _default_out(cache: Path) -> Path:
    stem = Path(str(cache).rstrip("/\\")).name
    for ext in (".h5", ".hdf5", ".zarr"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return Path("sweeps") / (stem or "sweep")


@click.command("sweep")
@click.option("--cache", "cache_path", required=True, type=click.Path(path_type=Path), help="Feature cache.")
@click.option("--classes", default="all", show_default=True, help="all, or normal classes by name/index: 0,3,cat.")
@click.option("--out", type=click.Path(path_type=Path), help="Sweep folder [default: sweeps/<cache>].")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="A fit setting and its values (repeatable; flow runs only), e.g. --grid fusion=none,semantic. "
                   f"Keys: {', '.join(GRID_KEYS)} (as `sanf fit`'s options, with _ for -).")
@click.option("--set", "fixed", multiple=True, metavar="KEY=VALUE",
              help="A fixed fit setting for every flow run (repeatable), e.g. --set epochs=1 --set hidden=512.")
@click.option("--methods", default="flow", show_default=True,
              help="Comma list of flow and registered baselines (knn, knn-l2, gaussian, patch-knn, ...; once per "
                   "class).")
@click.option("--seeds", default="0", show_default=True, help="Comma list of flow seeds, e.g. 0,1,2.")
@click.option("--score", type=_RegistryChoice(_scores), default="auto", show_default=True, help=SCORE_HELP)
@click.option("--workers", type=int, help="Parallel runs [default: the CPU cores; 1 on a GPU].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local processes, or Ray tasks (optional extra sanf[ray]).")
@click.option("--ray-address", help="Ray cluster address (e.g. auto, ray://host:10001) [default: a local instance].")
@click.option("--ray-cpus-per-task", type=float, default=1.0, show_default=True, help="Ray CPUs per run.")
@click.option("--ray-gpus-per-task", type=float, default=0.0, show_default=True,
              help="Ray GPUs per run (fractions share a GPU, e.g. 0.25).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N (flow runs).")
@click.option("--stack", default="auto", show_default=True,
              help="Flow runs trained at once in one process (settings differing only in seed/class): auto (from "
                   "free GPU memory; 1 on CPU) or N.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Per-run PNG plots (they cost time).")
@click.option("--keep-models", is_flag=True,
              help="Keep each flow run's model.safetensors (tens to hundreds of MB a run; see the README's disk "
                   "table). Without it a run keeps its scores, metrics, report and plots.")
@click.option("--overwrite", is_flag=True,
              help="Replace a sweep folder's plan; finished runs that stay identical are kept, others removed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(cache_path, classes, out, grid, fixed, methods, seeds, score, workers, executor, ray_address,
          ray_cpus_per_task, ray_gpus_per_task, device, stack, plots, keep_models, overwrite, quiet):
    """Run classes x grid x methods x seeds from one cache (the test split is read once); resumable."""
    if executor != "ray" and (ray_address or ray_gpus_per_task):
        raise SanfError("--ray-address/--ray-gpus-per-task need --executor ray")
    from ..cache import open_cache
    from ..sweep.plan import parse_fixed, parse_grid, parse_methods, parse_seeds, resolve_classes

    with open_cache(cache_path) as c:  # before torch is imported: a bad path or class fails at once
        resolve_classes(c.class_names, classes)
    parse_methods(methods)
    parse_grid(list(grid))  # an unknown key or a mistyped number too (a value not built in reads the registry)
    parse_fixed(list(fixed))
    parse_seeds(seeds)
    from ..sweep import run_sweep

    out = out or _default_out(cache_path)
    res = run_sweep(cache_path, out, classes, list(grid), methods, seeds, list(fixed), workers, executor,
                    device=device, score=score, plots=plots, overwrite=overwrite, quiet=quiet, keep_models=keep_models,
                    ray_address=ray_address, ray_cpus_per_task=ray_cpus_per_task,
                    ray_gpus_per_task=ray_gpus_per_task, stack=stack)
    s = res.summary
    where = (f"{res.workers} worker(s) x {res.threads_per_worker} thread(s)" if executor == "local"
             else f"Ray, {ray_cpus_per_task:g} CPU + {ray_gpus_per_task:g} GPU per run")
    if res.timings.get("stack_size", 1) > 1:
        where += f", flows in stacks of up to {res.timings['stack_size']}"
    removed = f", {len(res.removed)} run folder(s) of the old plan removed" if res.removed else ""
    click.echo(f"sweep {out}: {len(res.computed)} run(s) computed ({where}), {len(res.skipped)} already finished"
               f"{removed}; {res.timings['wall_s']:.1f} s")
    ranked = sorted(((v["mean"], k) for k, v in s["m_auroc"].items() if v["mean"] is not None), reverse=True)
    for mean, setting in ranked[:10]:
        std = s["m_auroc"][setting]["std_over_seeds"]
        click.echo(f"  M-AUROC {mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f"  {setting}")
    click.echo(f"summary: {out / 'summary.md'} (also summary.csv, summary.json, heatmap.png); runs in {out / 'runs'}")


@click.command("report")
@click.argument("sweep_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for summary.{csv,json,md} and heatmap.png [default: SWEEP_DIR itself].")
def report(sweep_dir, out):
    """Re-render a sweep's summary.{csv,json,md} and heatmap.png from its run folders (no rescoring)."""
    from ..sweep.plan import read_plan

    read_plan(sweep_dir)  # before torch is imported: a wrong folder fails at once
    from ..sweep import write_summary

    s = write_summary(sweep_dir, out)
    click.echo(f"{sweep_dir}: {s['n_finished']} of {s['n_runs']} run(s) finished; summary in "
               f"{Path(out or sweep_dir) / 'summary.md'} (also summary.csv, summary.json, heatmap.png)")
