"""README.md's onnxruntime snippet (the one ```python block holding ``MARKER``) runs as written against a real
`sanf export --format onnx` of a small run, and its scores, decisions and maps are `Detector.score`'s.

The export is built as a user would: `sanf extract` of a tiny random ViT over a tiny image folder (conftest's
``extract_config``), `sanf fit` with conftest's ``FAST_FIT`` (40% held out, so the run keeps its patch part and its
default score is the combined score, which has a map), `sanf export --format onnx`. The snippet then runs in a
folder holding only what it names: ``bottle.onnx``, ``bottle.onnx.json``, ``a.png`` and ``b.png``.

The fit uses ``--normalize l2`` rather than the default ``l2+whiten``: a random tiny ViT gives nearly the same
class token for every noise image, so the whitening matrix of 6 training rows has eigenvalues of about 10^6, and a
1e-7 relative change of a class token (onnxruntime's kernels against PyTorch's) moves the NLL by a nat or more.
That is this toy model's conditioning, not the snippet; with real weights the export agrees with PyTorch to 1e-3
relative (tests/test_detector.py). Everything the snippet reads (the preprocessing, the inputs and outputs, the
threshold, the held-out scores) is the same with either normalisation."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST_FIT, REPO, extract_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MARKER = "# sanf-readme: onnxruntime"


def readme_onnx_snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if MARKER in b]
    assert len(blocks) == 1, f"README.md should have exactly one ```python block with {MARKER!r}, found {len(blocks)}"
    return blocks[0]


def test_readme_has_the_marked_onnx_snippet():
    code = readme_onnx_snippet()
    compile(code, "README.md", "exec")
    for name in ("onnxruntime", "bottle.onnx", "preprocessing", "threshold", "scores"):
        assert name in code, name


def test_readme_onnx_snippet_gives_detector_scores(folder_dataset, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime", reason="the README's snippet needs onnxruntime: pip install 'sanf[export]'")
    pytest.importorskip("onnx", reason="sanf export --format onnx needs onnx: pip install 'sanf[export]'")
    from sanf_pipeline import Detector
    from sanf_pipeline.cli.main import cli
    from sanf_pipeline.extract.job import extract

    cache, run, work = tmp_path / "cache", tmp_path / "run", tmp_path / "work"
    extract(extract_config(folder_dataset, cache, dtype="float32"))
    invoke = CliRunner().invoke
    r = invoke(cli, ["fit", "--cache", str(cache), "--normal-class", "a", "--out", str(run), *FAST_FIT,
                     "--max-epochs", "2", "--val-fraction", "0.4", "--normalize", "l2"])
    assert r.exit_code == 0, r.output
    r = invoke(cli, ["export", "--run", str(run), "--format", "onnx", "--out", str(work / "bottle.onnx")])
    assert r.exit_code == 0, r.output
    # one normal and one anomalous test image, under the names the snippet uses
    shutil.copy(folder_dataset / "test" / "a" / "000.png", work / "a.png")
    shutil.copy(folder_dataset / "test" / "c" / "000.png", work / "b.png")

    det = Detector.load(run, device="cpu")
    assert det.score_kind == "combined" and det.has_maps  # the default score, with its map output
    want = det.score([work / "a.png", work / "b.png"], batch_size=2, num_workers=0, maps=True)
    assert not want.skipped

    monkeypatch.chdir(work)
    ns: dict = {"__name__": "readme_snippet"}
    exec(compile(readme_onnx_snippet(), "README.md", "exec"), ns)
    printed = capsys.readouterr().out.strip().splitlines()

    np.testing.assert_allclose(ns["scores"], want.scores, rtol=1e-4, atol=1e-4)
    assert ns["threshold"] == det.threshold["value"]
    assert [("anomalous" in line) for line in printed] == want.anomalous.tolist()
    assert ns["maps"] is not None and ns["maps"].shape == (2, *det.preprocessing["input_size"][1:])
    assert len(printed) == 2 and printed[0].startswith("a.png")
