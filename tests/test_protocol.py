"""benchmarks/protocol.py --tiny on CPU: the whole protocol (unpack, bare forward, extract, sweep, report) runs
unattended and reports every stage; the GPU run uses the same script."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import CIFAR_ZIP, REPO


def _protocol():
    spec = importlib.util.spec_from_file_location("protocol", REPO / "benchmarks" / "protocol.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_protocol_on_cpu(tmp_path, capsys):
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"shared CIFAR-10 JPEG archive not found at {CIFAR_ZIP}")
    out, md = tmp_path / "protocol", tmp_path / "protocol.md"
    assert _protocol().main(["--device", "cpu", "--tiny", "--workers", "0", "--out", str(out), "--markdown",
                             str(md)]) == 0
    printed = capsys.readouterr().out
    table = md.read_text()
    assert "--tiny" in table.splitlines()[0]
    for stage in ("bare forward", "sanf extract", "ratio extract / bare", "sweep", "report", "end to end"):
        assert f"| {stage}" in table, stage
    assert "300 CIFAR-10 JPEGs (300 extracted)" in table
    assert "30 runs (10 flows, seeds 0, + knn, gaussian per class)" in table
    assert "M-AUROC flow" in table and "knn" in table and "gaussian" in table
    times = json.loads(printed.strip().splitlines()[-1])
    assert set(times["times_s"]) == {"unpack", "extract", "sweep", "report"}
    assert times["extract_img_s"] > 0 and times["bare_img_s"] > 0
    assert not out.exists()  # removed after the run (no --keep)


def test_protocol_refuses_a_folder_it_did_not_make(tmp_path):
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"shared CIFAR-10 JPEG archive not found at {CIFAR_ZIP}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="not made by this script"):
        _protocol().main(["--device", "cpu", "--tiny", "--out", str(mine)])
    assert (mine / "keep.txt").read_text() == "a user's file"
