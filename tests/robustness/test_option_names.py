"""Every option a message names exists (a user told to pass `--root` finds no such option: it is `--data-root`)."""

from __future__ import annotations

import re
from pathlib import Path

import click
from conftest import assert_user_error
from robust_helpers import sanf

import sanf_pipeline
from sanf_pipeline.cli.main import cli


def cli_options() -> set[str]:
    out: set[str] = set()

    def walk(cmd):
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                walk(sub)
        for p in cmd.params:
            out.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))

    walk(cli)
    return out | {"--help"}


def test_every_option_named_in_the_package_exists():
    known = cli_options()
    unknown = {}
    for f in Path(sanf_pipeline.__file__).parent.rglob("*.py"):
        for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", f.read_text(encoding="utf-8")):
            if opt not in known:
                unknown.setdefault(opt, []).append(f.name)
    assert not unknown, f"options named in messages/help that no command has: {unknown}"


def test_missing_data_root_names_the_real_option(tmp_path):
    r = sanf("extract", "--backbone", "vit_small_patch14_dinov2", "--weights", "random", "--dataset", "folder",
             "--data-root", tmp_path / "nowhere", "--cache", tmp_path / "c")
    line = assert_user_error(r, "--data-root")
    assert "--root" not in line.replace("--data-root", "")
