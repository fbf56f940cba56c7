"""`sanf serve`: a trained run (or its ONNX export) as an HTTP service (thin over ``serve/``).

The arguments, the listening socket and the server's packages are checked before torch or FastAPI load (a wrong
path or a port in use fails in a second, as one line); then the detector loads once, the server says
``serving <run> on http://HOST:PORT`` on stdout (the real port for ``--port 0``) and logs one line per request on
stderr until Ctrl-C (or SIGTERM), which finishes the requests in flight and exits 0.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import signal
import socket
from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import Interrupted, SanfError
from ..train.options import _RegistryChoice
from .options import SCORE_HELP, THRESHOLD_HELP, _scores, check_decision, map_options, with_options

SERVER_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
                   "prometheus_client": "prometheus_client"}
RUN_ONLY = ("device", "score", "map_sigma", "pixel_rule", "weights", "weights_dir")  # fixed in an export (CPU)
GRACE_S = 30  # how long Ctrl-C waits for requests in flight


class _Stop(Exception):
    """SIGTERM, after the server's graceful shutdown."""


def _check_source(ctx, run_dir: Path | None, export: Path | None) -> None:
    if (run_dir is None) == (export is None):
        raise SanfError("give --run RUN (a run folder) or --export FILE.onnx (from `sanf export`), one of them")
    if run_dir is not None:
        if not run_dir.is_dir():
            raise SanfError(f"run folder {run_dir} does not exist; create it with `sanf fit` or `sanf baseline`")
        if not (run_dir / "config.json").is_file():
            raise SanfError(f"{run_dir} is not a sanf run (no config.json); create it with `sanf fit`")
        return
    if not export.is_file():
        raise SanfError(f"{export} is not a file; give the .onnx file written by `sanf export`")
    side = export.with_name(export.name + ".json")
    if not side.is_file():
        raise SanfError(f"{export} has no sidecar {side.name} next to it; export it again with `sanf export`")
    given = [f"--{n.replace('_', '-')}" for n in RUN_ONLY if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if given:
        raise SanfError(f"{', '.join(given)} apply to --run only (an export fixed them when it was written)")


def _check_packages() -> None:
    missing = [pip for mod, pip in SERVER_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise SanfError(f"sanf serve needs {', '.join(missing)}: pip install 'sanf[serve]'")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _listen(host: str, port: int) -> socket.socket:
    """The bound, listening socket (before the model loads, so that a port in use fails at once)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SanfError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise SanfError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host "
                        f"(--port 0 picks a free one)") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


@click.command("serve")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), help="Run folder from `sanf fit` or "
                                                                        "`sanf baseline`.")
@click.option("--export", type=click.Path(path_type=Path),
              help="Instead of --run: an ONNX file from `sanf export` (with its <file>.json sidecar), run with "
                   "onnxruntime on CPU.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 for every interface: then set --token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: a free one, printed).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N (--run; an export runs "
                                                                  "on CPU).")
@click.option("--score", type=_RegistryChoice(_scores), default="auto", show_default=True,
              help=SCORE_HELP + " Baseline runs have one score.")
@click.option("--fpr", type=float, help="Target false-positive rate of the threshold [default: the run's].")
@click.option("--threshold", type=float, help=THRESHOLD_HELP)
@with_options(map_options())
@click.option("--weights", help="Backbone weights file [default: the search order of `sanf score`].")
@click.option("--weights-dir", type=click.Path(path_type=Path), help="Folder of weights files [$SANF_WEIGHTS_DIR].")
@click.option("--batch-window-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the first waiting image waits for others to share its model call.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most images per model call.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=32.0, show_default=True,
              help="Largest request body (413 beyond).")
@click.option("--max-images", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most images per request (413 beyond).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True,
              help="Largest image, width x height, read from its header before decoding (413 beyond).")
@click.option("--token", envvar="SANF_SERVE_TOKEN", show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on /v1/* and /metrics (/, /healthz, /readyz stay open).")
@click.pass_context
def serve(ctx, run_dir, export, host, port, device, score, fpr, threshold, map_sigma, pixel_rule, weights, weights_dir,
          batch_window_ms, max_batch, max_upload_mb, max_images, max_pixels, token):
    """Serve a trained run as an HTTP API: POST images to /v1/score, get scores, decisions and anomaly maps.

    The scores equal `sanf score`'s for the same files. GET / is a page to try it; /v1/model describes the model;
    /healthz, /readyz and /metrics (Prometheus) are for operations.
    """
    _check_source(ctx, run_dir, export)
    check_decision(fpr, threshold)
    _check_packages()
    if token is not None and (not token or token != "".join(token.split())):
        raise SanfError("--token must be a secret without spaces (it travels as 'Authorization: Bearer TOKEN')")
    if not _loopback(host) and token is None:
        click.echo(f"warning: listening on {host} without --token: anyone who can reach it can use it", err=True)
    sock = _listen(host, port)
    label = str(run_dir if run_dir is not None else export)
    try:
        from ..serve.scoring import DetectorScorer, OnnxScorer

        scorer = OnnxScorer(export, fpr=fpr) if export is not None else \
            DetectorScorer.load(run_dir, device=device, score=score, fpr=fpr, map_sigma=map_sigma,
                                pixel_rule=pixel_rule, weights=weights, weights_dir=weights_dir)
        if threshold is not None:
            from ..evaluate.calibration import explicit_threshold

            scorer.threshold = explicit_threshold(threshold, scorer.calibration_scores)
    except KeyboardInterrupt:
        sock.close()
        raise Interrupted(f"nothing was served (stopped while loading {label})") from None
    except BaseException:
        sock.close()
        raise
    debug = bool((ctx.find_root().obj or {}).get("debug"))
    _run(scorer, sock, label, token=token, max_batch=max_batch, batch_window_ms=batch_window_ms,
         max_upload_mb=max_upload_mb, max_images=max_images, max_pixels=max_pixels, debug=debug)


def _run(scorer, sock, label, *, token, max_batch, batch_window_ms, max_upload_mb, max_images, max_pixels,
         debug) -> None:
    import uvicorn

    from ..serve.app import create_app
    from ..serve.upload import Limits

    limits = Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_images=max_images, max_pixels=max_pixels)
    app = create_app(scorer, limits=limits, token=token, max_batch=max_batch, batch_window_ms=batch_window_ms,
                     debug=debug)
    url = _url(sock)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                click.echo(f"serving {label} on {url}")

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=GRACE_S)
    server = Server(config)

    def stop(signum, frame):
        raise _Stop()

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler it found here
    old = signal.signal(signal.SIGTERM, stop)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        sock.close()
    click.echo(f"stopped serving {label}", err=True)
