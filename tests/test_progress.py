"""Plain-line progress for logs: timed lines, a final line at completion, ETA from this run's own rate."""

from __future__ import annotations

from sanf_pipeline.progress import LogLines


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_lines_print_on_interval_and_at_completion():
    clock, lines = FakeClock(), []
    bar = LogLines(lines.append, interval=30, clock=clock)
    task = bar.add_task("extract vit", total=100, rate="")
    clock.t = 10
    bar.update(task, advance=10, rate="1.0 img/s")
    assert lines == []  # inside the interval
    clock.t = 40
    bar.update(task, advance=30, rate="1.0 img/s")
    assert lines == ["extract vit: 40/100 (40%), 1.0 img/s, 40 s elapsed, ~60 s left"]
    clock.t = 50
    bar.update(task, advance=10)
    assert len(lines) == 1
    clock.t = 100
    bar.update(task, completed=100)
    assert lines[-1] == "extract vit: 100/100 (100%), 1.0 img/s, 100 s elapsed"
    bar.update(task, completed=100)
    assert len(lines) == 2  # completion is reported once


def test_log_lines_eta_counts_only_work_done_in_this_run():
    clock, lines = FakeClock(), []
    bar = LogLines(lines.append, interval=0, clock=clock)
    task = bar.add_task("fit", total=100, completed=50, rate="")  # resumed at 50
    clock.t = 10
    bar.advance(task, 10)
    assert lines == ["fit: 60/100 (60%), 10 s elapsed, ~40 s left"]


def test_log_lines_without_total_and_description_change():
    clock, lines = FakeClock(), []
    bar = LogLines(lines.append, interval=5, clock=clock)
    task = bar.add_task("sweep", total=None)
    clock.t = 6
    bar.update(task, advance=3, description="sweep s: run 3")
    assert lines == ["sweep s: run 3: 3, 6 s elapsed"]
