"""One progress style for every long job: a rich bar on a terminal, timed plain lines in a log, silent with
``quiet=True``.

Rich draws nothing until the end when stderr is not a terminal (a batch job's log, ``nohup``, CI), so there
``progress_bar`` prints one line every ``SANF_PROGRESS_INTERVAL`` seconds (default 30) and one when a task
completes, in the form ``extract vit_small: 3072/20000 (15%) 14.8 img/s, 207 s elapsed, ~1142 s left``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Silent:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass


class LogLines:
    """The ``add_task``/``update``/``advance`` subset of rich's Progress, printed as timed plain lines."""

    def __init__(self, write, interval: float, clock=time.monotonic):
        self._write, self._interval, self._clock = write, interval, clock
        self._tasks: list[dict] = []

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = self._clock()
        self._tasks.append({"description": description, "total": total, "completed": completed,
                            "start": completed, "fields": fields, "t0": now, "last": now, "done": False})
        return len(self._tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, advance: float = 0, completed: float | None = None, total: float | None = None,
               description: str | None = None, **fields) -> None:
        t = self._tasks[task]
        if completed is not None:
            t["completed"] = completed
        t["completed"] += advance
        if total is not None:
            t["total"] = total
        if description is not None:
            t["description"] = description
        t["fields"].update(fields)
        now = self._clock()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if finished and not t["done"]:
            t["done"] = True
            self._emit(t, now)
        elif not finished and now - t["last"] >= self._interval:
            self._emit(t, now)

    def _emit(self, t: dict, now: float) -> None:
        t["last"] = now
        done, total, elapsed = t["completed"], t["total"], now - t["t0"]
        parts = [f"{t['description']}: {done:g}"]
        if total:
            parts[0] += f"/{total:g} ({100 * done / total:.0f}%)"
        rate = t["fields"].get("rate")
        if rate:
            parts.append(str(rate))
        parts.append(f"{elapsed:.0f} s elapsed")
        gained = done - t["start"]
        if "left" in t["fields"]:  # the caller's own estimate (a fit: from measured epochs)
            if t["fields"]["left"] and done < (total or math.inf):
                parts.append(str(t["fields"]["left"]))
        elif total and gained > 0 and done < total:
            parts.append(f"~{elapsed * (total - done) / gained:.0f} s left")
        self._write(", ".join(parts))


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("SANF_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


@contextlib.contextmanager
def progress_bar(quiet: bool = False, unit: str = "img", measured_eta: bool = False):
    """A progress display with count, rate (``{unit}/s``, from the task field ``rate``) and ETA (with
    ``measured_eta``: the caller's text in the task field ``left`` instead of rich's extrapolation)."""
    if quiet:
        yield _Silent()
        return
    if not (console.is_terminal or console.is_jupyter):
        yield LogLines(lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True), _interval())
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[left]}") if measured_eta else TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        yield bar
