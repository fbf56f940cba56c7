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
