"""`sanf fit`'s options come from the FitConfig field declarations, `sanf sweep --set` parses every setting as
`sanf fit` does, the run identity is versioned (older run folders stay recognised), and `sanf baseline --device`
(issue 18)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from conftest import FAST_FIT, REPO, sub_env

from sanf_pipeline.cli.main import cli
from sanf_pipeline.errors import SanfError
from sanf_pipeline.store.atomic import settings_id
from sanf_pipeline.store.run_folder import prepare_out_dir
from sanf_pipeline.sweep.plan import NOT_GRID, parse_fixed, parse_value
from sanf_pipeline.train import config as fit_config
from sanf_pipeline.train.config import IDENTITY_KEY, NOTHING, FitConfig, convert_settings, setting_of, training_length
from sanf_pipeline.train.options import fit_param_name, fit_value_type, fit_values

FIELDS = dataclasses.fields(FitConfig)
FIT = cli.commands["fit"]
NOT_FIT_SETTINGS = {"cache_path", "normal_class", "out", "overwrite", "quiet"}  # paths and behaviour, by hand
# every flag `sanf fit` had before its options were generated: scripts and the README keep working
FLAGS_BEFORE = (
    "--cache --normal-class --out --fusion --blocks --clamp --hidden --heads --spatial-channels --token-pool "
    "--main-input --normalize --lr --weight-decay --batch-size --grad-clip --epochs --early-stopping --max-epochs "
    "--val-fraction --patience --keep-initial --no-keep-initial --min-epoch-steps --noise --patch-score "
    "--patch-coreset --patch-neighbourhood --seed --fpr --device --no-amp --checkpoint-every --overwrite --quiet"
).split()


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def cli_settings(*args) -> dict:
    """What `sanf fit ARGS` hands to training_length (parsing only: no cache is opened)."""
    ctx = FIT.make_context("fit", ["--cache", "c", "--normal-class", "0", *args])
    return fit_values(dict(ctx.params))


def flag_of(f) -> str:
    return setting_of(f).flag or "--" + f.name.replace("_", "-")


# ----------------------------------------------------------------------------- one declaration per setting
def test_every_setting_is_declared_with_a_help_text():
    for f in FIELDS:
        spec = setting_of(f)
        assert spec.help.strip() and spec.help.strip()[-1] in ".]", f.name
        assert spec.applies is None or spec.identity, f.name  # "where it applies" only means something in the id


def test_every_setting_is_a_fit_option_and_the_old_flags_remain():
    params = {p.name: p for p in FIT.params}
    assert set(params) == {fit_param_name(f) for f in FIELDS} | NOT_FIT_SETTINGS
    opts = {o for p in FIT.params for o in (*p.opts, *p.secondary_opts)}
    assert set(FLAGS_BEFORE) <= opts
    for f in FIELDS:
        p, spec = params[fit_param_name(f)], setting_of(f)
        assert spec.help in p.help, f.name
        if p.is_flag or spec.given_only or p.default is None:
            continue
        assert p.default == f.default, f.name  # the default shown is FitConfig's, no copy to keep in step
        assert p.show_default or isinstance(f.default, tuple), f.name
    # the help tells what --epochs trains on: the held-out share stays out for the threshold
    epochs = params["epochs"].help
    assert "90% of the training rows" in epochs and "held-out 10%" in epochs and "all training rows" not in epochs
    help_text = " ".join(run("fit", "--help").output.split())
    for flag in ("--attn-dim", "--betas B1:B2", "--eps", "--min-delta", "--eval-batch-size"):
        assert flag in help_text, flag
    assert "[default: 0.9:0.999]" in help_text and "Early stopping: the most epochs. [default: 30]" in help_text


def test_every_setting_but_seed_and_device_is_a_set_key():
    from sanf_pipeline.train.options import _shown

    keys = {f.name for f in FIELDS} - set(NOT_GRID)
    fixed = parse_fixed([f"{f.name}={_shown(f.default)}" for f in FIELDS if f.name in keys])
    assert set(fixed) == keys
    assert FitConfig.from_dict(fixed) == FitConfig()  # each default, as text, parses back to itself
    for key in NOT_GRID:
        with pytest.raises(SanfError, match=NOT_GRID[key]):
            parse_fixed([f"{key}=1"])


def _samples(f) -> list[str]:
    kind, ann = fit_value_type(f.name), str(f.type).replace(" ", "")
    if isinstance(kind, click.Choice):
        return [*kind.choices, "bogus", ""]
    if ann.startswith("tuple"):
        return ["0.8:0.9", "0.8,0.9", "0.5:0.5:0.5", "0.5", "a:b", "0.9:1"]
    base = {"int": ["1", "2", "7", "0", "-3", "2.5", "x", "1e3"], "float": ["0.5", "3", "1e-3", "0", "-1", "inf", "x"],
            "str": ["cpu", "cuda:1"]}[ann.split("|")[0]]
    return base + (["none", "null", "None"] if "None" in ann else ["none"])


def _outcome(parse):
    try:
        return True, parse()
    except (SanfError, click.UsageError) as exc:
        return False, type(exc)


def _config(settings: dict):
    """The validated FitConfig of settings, or the error that refuses them."""
    try:
        return FitConfig.from_dict(training_length(settings)).validate()
    except SanfError as exc:
        return str(exc).split(":")[0]


@pytest.mark.parametrize("f", [f for f in FIELDS if f.type != "bool"], ids=lambda f: f.name)
def test_fit_option_and_set_parse_a_value_alike(f):
    flag = flag_of(f)
    for text in _samples(f):
        cli_ok, cli_value = _outcome(lambda: cli_settings(flag, text)[f.name])  # noqa: B023
        set_ok, set_value = _outcome(lambda: parse_value(f.name, text))  # noqa: B023
        assert cli_ok == set_ok, (f.name, text, cli_value, set_value)
        if not cli_ok:
            continue
        assert cli_value == set_value and type(cli_value) is type(set_value), (f.name, text)
        # and the whole fit they describe: the same FitConfig, refused by validate alike
        via_set = ({f.name: set_value} if f.name in NOT_GRID else parse_fixed([f"{f.name}={text}"]))
        assert _config(cli_settings(flag, text)) == _config(via_set), (f.name, text)


@pytest.mark.parametrize("f", [f for f in FIELDS if f.type == "bool"], ids=lambda f: f.name)
def test_fit_flag_and_set_parse_a_switch_alike(f):
    spec, flag = setting_of(f), flag_of(f)
    if spec.invert:
        cases = [([flag], False), ([], True)]
    elif spec.given_only:
        cases = [([flag], True)]
        assert f.name not in cli_settings()  # not given: training_length decides
    else:
        cases = [([flag], True), ([f"--no-{flag[2:]}"], False), ([], f.default)]
    for args, value in cases:
        assert cli_settings(*args)[f.name] is value
        assert parse_value(f.name, str(value).lower()) is value
        assert _config(cli_settings(*args)) == _config(parse_fixed([f"{f.name}={str(value).lower()}"]))


def test_training_length_options_agree_with_set():
    cases = [(["--epochs", "3"], ["epochs=3"]), (["--max-epochs", "5", "--patience", "2"],
                                                 ["max_epochs=5", "patience=2"]),
             (["--early-stopping", "--min-delta", "0.1"], ["early_stopping=true", "min_delta=0.1"]),
             (["--epochs", "2", "--early-stopping"], ["epochs=2", "early_stopping=true"]),
             (["--epochs", "2", "--val-fraction", "0.2"], ["epochs=2", "val_fraction=0.2"])]
    for args, items in cases:
        def cli_side(args=args):
            return _config(cli_settings(*args))

        def set_side(items=items):
            return _config(parse_fixed(items))
        assert _outcome(cli_side) == _outcome(set_side), args


def test_grad_clip_zero_means_off_everywhere():
    assert FitConfig(grad_clip=0).grad_clip is None and FitConfig(grad_clip=0.0).validate().grad_clip is None
    assert FitConfig(**cli_settings("--grad-clip", "0")).grad_clip is None
    assert FitConfig.from_dict(parse_fixed(["grad_clip=0"])).grad_clip is None


def test_parsing_options_and_set_values_imports_no_torch():
    code = """
import sys
from sanf_pipeline.cli.main import cli
from sanf_pipeline.train.options import fit_values
ctx = cli.commands["fit"].make_context("fit", ["--cache", "c", "--normal-class", "0", "--fusion", "gap",
                                              "--normalize", "l2", "--betas", "0.8:0.9", "--attn-dim", "none"])
settings = fit_values(dict(ctx.params))
from sanf_pipeline.train.config import FitConfig, training_length
FitConfig(**training_length(settings)).settings()
heavy = [m for m in ("torch", "timm", "numpy") if m in sys.modules]
assert not heavy, heavy  # `sanf fit --help` and its argument errors stay fast
from sanf_pipeline.sweep.plan import parse_fixed
parse_fixed(["fusion=gap", "main_input=spatial", "betas=0.8:0.9", "patch_score=none", "token_pool=2"])
heavy = [m for m in ("torch", "timm") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=sub_env(), cwd=REPO,
                       timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------- the run identity
def _settings_before_versions(cfg: FitConfig) -> dict:
    """FitConfig.settings() as sanf computed it before identity versions, verbatim: version 1 must stay it."""
    d = cfg.to_dict()
    for k in ("device", "eval_batch_size", "fpr", "checkpoint_every"):
        d.pop(k, None)
    if cfg.token_pool == 1:
        d.pop("token_pool")
    for k, v in (("min_epoch_steps", 1), ("noise", 0.0), ("keep_initial", False), ("patch_score", "none"),
                 ("combine", "sum")):  # combine came later: its implied "sum" is the record before it
        if d[k] == v:
            d.pop(k)
    if cfg.patch_score == "none":
        d.pop("patch_coreset")
        d.pop("patch_neighbourhood")
    if not cfg.early_stopping:
        d.pop("keep_initial", None)
        for k in ("patience", "max_epochs", "min_delta"):
            d.pop(k)
    else:
        d.pop("epochs")
    return d


def _configs():
    for es, ps, pool, noise, steps, keep, extra in itertools.product(
            (True, False), ("patch-knn", "none"), (1, 2), (0.0, 0.3), (1, 5), (True, False),
            ({}, {"device": "cpu", "fpr": 0.05, "eval_batch_size": 8, "checkpoint_every": 0, "epochs": 4,
                  "patch_coreset": 0.5, "grad_clip": None, "attn_dim": 8, "betas": (0.8, 0.9)})):
        yield FitConfig(early_stopping=es, patch_score=ps, token_pool=pool, noise=noise, min_epoch_steps=steps,
                        keep_initial=keep, **extra)


def test_identity_version_1_is_the_record_before_versions():
    for cfg in _configs():
        assert cfg.settings(1) == _settings_before_versions(cfg)
        assert IDENTITY_KEY not in cfg.settings(1)
    # the run ids of folders written before versions existed (settings_id of their records) are these
    pinned = [({}, "cb99303c8344fcd8"), ({"early_stopping": False, "epochs": 3}, "36e6600276ab6862"),
              ({"patch_score": "none"}, "fd43c973cb0e7e2c"),
              ({"token_pool": 2, "noise": 0.1, "min_epoch_steps": 4, "keep_initial": False}, "a03c0d5da279e4a0")]
    for kw, sid in pinned:
        assert settings_id(FitConfig(**kw).settings(1)) == sid, kw
    assert FitConfig().settings() == FitConfig().settings(fit_config.IDENTITY_VERSION)


def test_identity_version_2_records_every_setting_that_applies():
    for cfg in _configs():
        rec = cfg.settings(2)
        assert rec[IDENTITY_KEY] == 2
        for f in FIELDS:
            spec = setting_of(f)
            applies = spec.identity and (spec.applies is None or spec.applies(cfg))
            assert (f.name in rec) == applies, (f.name, cfg)
    assert {"token_pool", "noise", "min_epoch_steps", "patch_score"} <= set(FitConfig(patch_score="none").settings(2))
    # only what changes the model: the device or the checkpoint interval do not make another run
    assert FitConfig(device="cpu", checkpoint_every=0, fpr=0.2).settings(2) == FitConfig().settings(2)
    assert FitConfig(early_stopping=False, patience=9).settings(2) == FitConfig(early_stopping=False).settings(2)


def test_records_convert_between_versions():
    implied = {f.name for f in FIELDS if setting_of(f).implied is not NOTHING}
    assert implied == {"token_pool", "min_epoch_steps", "noise", "keep_initial", "patch_score", "combine"}
    for cfg in _configs():
        v1, v2 = cfg.settings(1), cfg.settings(2)
        assert convert_settings(v1, 2) == v2 and convert_settings(v2, 1) == v1
        assert convert_settings(v1, 1) == v1 and convert_settings(v2, 2) == v2
        assert FitConfig.from_settings(v1).settings(2) == v2
        # JSON on disk, as a run folder holds it
        assert convert_settings(json.loads(json.dumps(v1)), 2) == v2
    # records sanf did not write come back unchanged, so they match no run (as before)
    v2 = FitConfig().settings(2)
    for odd in ({**v2, IDENTITY_KEY: 3}, {**v2, "bogus": 1}, {**FitConfig().settings(1), "noise": 0.0},
                {**v2, "blocks": "four"}, None, [1], {IDENTITY_KEY: 2}):
        assert convert_settings(odd, 2) == odd
    with pytest.raises(SanfError, match="newer sanf"):
        FitConfig.from_settings({**v2, IDENTITY_KEY: 3})
    with pytest.raises(SanfError, match="identity version"):
        FitConfig().settings(0)


def _flow_config(fit: dict, status: str = "running") -> dict:
    return {"format": "sanf-run", "format_version": 1, "kind": "flow", "status": status,
            "settings": {"fit": fit, "cache_fingerprint": "f", "normal_class": 0}}


def test_an_unfinished_run_of_an_older_identity_version_resumes(tmp_path, monkeypatch):
    cfg = FitConfig(early_stopping=False, epochs=2, token_pool=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(_flow_config(cfg.settings(1))))
    monkeypatch.setattr(fit_config, "IDENTITY_VERSION", 2)  # as once new runs record version 2
    convert = fit_config.current_run_settings  # what jobs.fit_run passes
    assert prepare_out_dir(out, {"fit": cfg.settings(), "cache_fingerprint": "f", "normal_class": 0},
                           overwrite=False, convert=convert) == "resume"
    other = FitConfig(early_stopping=False, epochs=3, token_pool=2)
    with pytest.raises(SanfError, match="other settings"):
        prepare_out_dir(out, {"fit": other.settings(), "cache_fingerprint": "f", "normal_class": 0}, overwrite=False,
                        convert=convert)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_finished_run_of_an_older_identity_version_is_still_finished(pets_cache, tmp_path, monkeypatch):
    from sanf_pipeline.jobs.flow import load_run

    out = tmp_path / "r"
    args = ("fit", "--cache", pets_cache, "--normal-class", "dog", "--out", out, "--epochs", "1", *FAST_FIT)
    monkeypatch.setattr(fit_config, "IDENTITY_VERSION", 1)  # the folder an older sanf wrote
    r = run(*args)
    assert r.exit_code == 0, r.output
    written = json.loads((out / "config.json").read_text())
    assert IDENTITY_KEY not in written["settings"]["fit"]
    monkeypatch.setattr(fit_config, "IDENTITY_VERSION", 2)
    r = run(*args)
    assert r.exit_code == 0 and "already finished with these settings" in r.output, r.output
    loaded = load_run(out)
    assert loaded.config["run_id"] == written["run_id"]  # its id stays, the files still belong together
    assert loaded.config["settings"]["fit"][IDENTITY_KEY] == 2  # compared in today's terms
    assert json.loads((out / "config.json").read_text()) == written  # nothing rewritten
    r = run(*args[:-len(FAST_FIT)], *FAST_FIT, "--seed", "1")
    assert r.exit_code != 0 and "seed" in r.output  # other settings are still refused


# ------------------------------------------------------------------------------------ sanf baseline --device
def test_baseline_device_option_reaches_baseline_run(pets_cache, tmp_path, monkeypatch):
    import inspect

    from sanf_pipeline.jobs import api as jobs

    device = next(p for p in cli.commands["baseline"].params if p.name == "device")
    assert device.default == "auto" == inspect.signature(jobs.baseline_run).parameters["device"].default
    seen = {}
    real = jobs.baseline_run

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "baseline_run", spy)
    r = run("baseline", "--cache", pets_cache, "--normal-class", "dog", "--method", "gaussian", "--device", "cpu",
            "--out", tmp_path / "b", "--quiet")
    assert r.exit_code == 0, r.output
    assert seen["device"] == "cpu" and "AUROC" in r.output
