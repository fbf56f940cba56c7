"""`sanf score` and `sanf export`: a trained run used as a detector (thin over detector.py and export.py)."""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path

import click

from ..errors import Interrupted, SanfError
from ..train.options import _RegistryChoice
from .options import SCORE_HELP, THRESHOLD_HELP, _scores, check_decision, map_options

CSV_HEADER = ["path", "score", "anomalous", "percentile"]


def _detector_options(f):
    for opt in reversed([
        click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
                     help="Run folder from `sanf fit`."),
        click.option("--weights", help="Backbone weights file [default: --weights-dir, $SANF_WEIGHTS_DIR, the file "
                                       "used at extraction if still there, then timm's download]; checked against "
                                       "the run's sha256."),
        click.option("--weights-dir", type=click.Path(path_type=Path), help="Folder of weights files "
                                                                             "[$SANF_WEIGHTS_DIR]."),
        click.option("--fpr", type=float, help="Target false-positive rate of the threshold [default: the run's]."),
        click.option("--threshold", type=float, help=THRESHOLD_HELP),
        click.option("--score", type=_RegistryChoice(_scores), default="auto", show_default=True,
                     help=SCORE_HELP + " Baseline runs have one score."),
        *map_options(),
    ]):
        f = opt(f)
    return f


def _scores_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for r in rows:
        w.writerow([r["path"], repr(r["score"]), int(r["anomalous"]), f"{r['percentile']:.4f}"])
    return buf.getvalue()


def _check_out(path: Path, overwrite: bool, what: str) -> None:
    """Replace only a file sanf wrote before (or anything with --overwrite); never a folder."""
    if path.is_dir():
        raise SanfError(f"{path} is a folder; give a file name for {what}")
    if not path.parent.is_dir():
        raise SanfError(f"folder {path.parent} does not exist; create it or choose another {what}")
    if path.exists() and not overwrite:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                head = fh.read(200)
        except OSError:
            head = ""
        ours = head.startswith(",".join(CSV_HEADER)) or ('"format": "sanf-scores"' in head)
        if not ours:
            raise SanfError(f"{path} exists and is not a sanf scores file; pass --overwrite or choose another {what}")


def _check_inputs(inputs) -> None:
    """A path that does not exist (and is no glob pattern) fails before torch is imported; ``expand_inputs`` (which
    imports it with the detector) checks the rest: empty folders, patterns that match nothing."""
    for text in inputs:
        if not Path(text).expanduser().exists() and not glob.has_magic(text):
            raise SanfError(f"{text} does not exist (give image files, folders or glob patterns)")


def _score_interrupted(writer, out, json_out) -> str:
    """What an interrupted `sanf score` leaves: the scores are written only at the end (nothing to resume), the
    maps image by image (the group prints this after "interrupted; ")."""
    results = " and ".join(str(p) for p in (out, json_out) if p is not None and str(p) != "-") or "stdout"
    if writer is None or not writer.rows:
        return f"nothing was written (the scores go to {results} only at the end); rerun the command to score again"
    return (f"no scores were written (they go to {results} only at the end), only the maps of {len(writer.rows)} "
            f"image(s) in {writer.folder}; rerun the command with --overwrite to score again")


@click.command("score")
@_detector_options
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), help="CSV file (path, score, anomalous, percentile) "
                                                            "[default: CSV on stdout].")
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Also write the results, the threshold and the skipped files as JSON ('-' for stdout).")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="Unreadable images: list and skip, or stop at the first.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--num-workers", type=click.IntRange(min=0), help="DataLoader workers for decoding [cores - 1].")
@click.option("--maps", "maps_dir", type=click.Path(path_type=Path),
              help="Folder for each image's overlay PNG (<name>.overlay.png: jet map over the image, predicted "
                   "region's contour, score and decision) and raw map (<name>.map.npy: float32 at the image's "
                   "resolution), indexed in sanf-maps.json. Runs whose score has spatial support only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out/--json file that sanf did not write, and "
                                                 "the maps of an earlier `sanf score --maps` into the same folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score(run_dir, weights, weights_dir, fpr, threshold, score, map_sigma, pixel_rule, inputs, out, json_out, on_error,
          device, batch_size, num_workers, maps_dir, overwrite, quiet):
    """Score image files, folders (recursive) and glob patterns with a trained run.

    Each image gets its anomaly score, whether it is anomalous at the run's calibrated threshold, and its
    percentile among the held-out normal training images' scores; with --maps also its anomaly map.
    """
    check_decision(fpr, threshold)
    _check_inputs(inputs)
    from ..detect.detector import expand_inputs
    from ..detect.overlays import MapWriter
    from ..evaluate.calibration import describe_threshold
    from ..store.atomic import write_text_atomic

    for p in (out, json_out):
        if p is not None and str(p) != "-":
            _check_out(p, overwrite, "--out" if p is out else "--json")
    files = expand_inputs(inputs)  # bad paths fail before the backbone loads
    writer = None
    try:
        det = _load_detector(run_dir, weights, weights_dir, device, score, fpr, threshold, map_sigma, pixel_rule)
        if maps_dir is not None:
            det._require_maps()
            writer = MapWriter(maps_dir, det, files, overwrite=overwrite)
        res = det.score(files, batch_size=batch_size, num_workers=num_workers, on_error=on_error, quiet=quiet,
                        maps=writer is not None, on_batch=writer)
    except KeyboardInterrupt:
        raise Interrupted(_score_interrupted(writer, out, json_out)) from None
    if writer is not None:
        writer.finish(res.skipped)
    rows = res.rows()
    text = _scores_csv(rows)
    if out is not None:
        write_text_atomic(out, text)
    if json_out is not None:
        doc = json.dumps({"format": "sanf-scores", "run": str(run_dir), "score": det.score_kind,
                          "threshold": res.threshold, "results": rows, "skipped": res.skipped, "n_scored": len(rows),
                          "n_flagged": int(res.anomalous.sum()), "n_skipped": len(res.skipped)}, indent=1)
        if str(json_out) == "-":
            click.echo(doc)
        else:
            write_text_atomic(json_out, doc + "\n")
    elif out is None:
        click.echo(text, nl=False)
    for s in res.skipped[:20]:
        click.echo(f"skipped {s['path']}: {s['reason']}", err=True)
    if len(res.skipped) > 20:
        click.echo(f"... and {len(res.skipped) - 20} more skipped (all are in --json)", err=True)
    to_stdout = out is None and json_out is None or str(json_out) == "-"
    where = (f"; results in {out}" if out else "") + (f"; maps in {maps_dir}" if maps_dir else "")
    thr = describe_threshold(res.threshold) if res.threshold else "no calibrated threshold"
    click.echo(f"{len(rows)} scored, {int(res.anomalous.sum())} flagged anomalous, {len(res.skipped)} skipped "
               f"({thr}){where}", err=to_stdout)


def _load_detector(run_dir, weights, weights_dir, device, score, fpr, threshold, map_sigma, pixel_rule):
    """``Detector.load``, with an explicit ``--threshold`` in place of the calibrated one."""
    from ..detect.detector import Detector
    from ..evaluate.calibration import explicit_threshold

    det = Detector.load(run_dir, weights=weights, weights_dir=weights_dir, device=device, score=score, fpr=fpr,
                        map_sigma=map_sigma, pixel_rule=pixel_rule)
    if threshold is not None:
        det.threshold = explicit_threshold(threshold, det.calibration_scores)
    return det


@click.command("export")
@_detector_options
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True,
              help="onnx (opset 17, dynamic batch) or torchscript (traced).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Model file; the sidecar JSON (preprocessing, threshold) goes next to it as <out>.json.")
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
def export(run_dir, weights, weights_dir, fpr, threshold, score, map_sigma, pixel_rule, fmt, out, overwrite):
    """Export a trained run as one model (image tensor in; score, and the anomaly map where the score has one, out)
    plus a sidecar JSON."""
    from ..detect.export import check_export_path  # torch-free: a bad --out fails in a second, not after loading

    check_decision(fpr, threshold)
    check_export_path(out, fmt, overwrite)  # before the backbone loads
    from ..detect.export import export_detector
    from ..evaluate.calibration import describe_threshold

    det = _load_detector(run_dir, weights, weights_dir, "cpu", score, fpr, threshold, map_sigma, pixel_rule)
    meta = export_detector(det, out, fmt, overwrite=overwrite)
    thr = meta["threshold"]
    click.echo(f"exported {out} ({fmt}{', opset ' + str(meta['opset']) if meta['opset'] else ''}, input "
               f"{meta['inputs']['images']['shape']}) and {out}.json; "
               f"{describe_threshold(thr) if thr else 'no calibrated threshold'}")
