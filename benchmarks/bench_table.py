"""The way every benchmark script reports: a two-column table of (measure, result) rows printed aligned to the
terminal, and the exact command that produced it (so a committed .md can be regenerated)."""

from __future__ import annotations

import sys


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def command_line(script: str, argv: list[str] | None) -> str:
    """``python benchmarks/<script> <args>`` as it was run (argv None: the process's own arguments)."""
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def dated_section(script: str, argv: list[str] | None, rows: list[tuple[str, str]],
                  header: tuple[str, str] = ("measure", "result")) -> str:
    """A markdown section: today's date and the command as its title, then the rows as a table."""
    import time

    return (f"### {time.strftime('%Y-%m-%d')}: `{command_line(script, argv)}`\n\n"
            + "\n".join(markdown_rows(rows, header)) + "\n")


def markdown_rows(rows: list[tuple[str, str]], header: tuple[str, str] = ("measure", "result")) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def layer_tag(layer) -> str:
    """``Llast``, ``L8``, ``L2+3``: a cache layer setting in names and titles."""
    if layer in (None, ""):
        return "Llast"
    return "L" + str(layer).replace(",", "+").replace(" ", "")


def same_cache(path, backbone: str, layer, image_size: int, pool: int, *, masks: bool = False) -> bool:
    """A sealed cache at ``path`` built with this backbone, layer, image size and pool (nothing to extract); with
    ``masks``, one whose test split records ground-truth masks."""
    from pathlib import Path

    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.errors import SanfError
    from sanf_pipeline.extract.backbones import parse_layers

    if not (Path(path) / "sanf.json").exists():
        return False
    try:
        with open_cache(path) as c:
            bb = c.backbone
            has_masks = c.split("test").has_masks if "test" in c.splits else False
    except SanfError:
        return False
    n = bb.get("num_layers", 1 << 30)
    want = parse_layers(layer)
    want = tuple(w % n for w in want) if isinstance(want, tuple) else (None if want is None else want % n)
    got = bb.get("layer")
    got = tuple(got) if isinstance(got, list) else got
    return ((has_masks or not masks) and backbone in (bb.get("name"), bb.get("arch"), bb.get("alias")) and got == want
            and list(bb.get("image_size") or []) == [image_size, image_size] and int(bb.get("pool", 1)) == pool)


def upsert_section(path, title: str, section: str, header: str) -> None:
    """Replace the section ``## title`` of the markdown file ``path`` with ``section`` (appended when new; a new file
    starts with ``header``)."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text() if path.exists() else header
    head = f"## {title}\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(text)


class Runner:
    """Runs ``python -m sanf_pipeline ...`` subprocesses (in ``cwd``), logs their output to ``log``, returns their
    wall seconds; a failure stops the benchmark with the command's output."""

    def __init__(self, log, echo: bool = True, cwd=None):
        self.log, self.echo, self.cwd = log, echo, cwd

    def __call__(self, *args) -> float:
        import subprocess
        import time

        cmd = [sys.executable, "-m", "sanf_pipeline", *map(str, args)]
        shown = "sanf " + " ".join(map(str, args))
        if self.echo:
            print(f"+ {shown}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.cwd)
        secs = time.perf_counter() - t
        with open(self.log, "a") as f:
            f.write(f"$ {shown}\n{proc.stdout}{proc.stderr}[rc {proc.returncode}, {secs:.2f} s]\n\n")
        if proc.returncode:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"failed (rc {proc.returncode}): {shown}")
        return secs


HALVES_RULE = ("within each class folder, test images sorted by sample id (the path relative to the data root): even "
               "positions (0, 2, 4, ...) = *selection* half, odd = *report* half")


def halves(labels, sample_ids) -> dict:
    """Row indices of the selection (even positions) and report (odd) halves of a test split: per class, by sorted
    sample id (``HALVES_RULE``). Every default is chosen on the selection half; numbers are reported on the other."""
    import numpy as np

    labels = np.asarray(labels)
    ids = np.asarray(sample_ids, dtype=object)
    sel, rep = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[np.argsort(ids[rows].astype(str), kind="stable")]
        sel.extend(rows[0::2].tolist())
        rep.extend(rows[1::2].tolist())
    return {"selection": np.sort(np.asarray(sel, int)), "report": np.sort(np.asarray(rep, int))}
