"""Seeing the mechanism end to end: a real tiny sweep logs the diagnostics (weight norm and effective step per
stage, decay timescale) to MLflow once per epoch, and ``adareg report`` draws them."""

from __future__ import annotations

import math
import subprocess

import pytest
from e2e import Store, sweep_cmd, write_sweep
from PIL import Image

from training.callbacks import DIAGNOSTICS, NO_DECAY

pytestmark = pytest.mark.slow  # two tiny training runs in worker processes: ~100 s on 2 shared cores


def test_a_tiny_sweep_logs_the_diagnostics_every_epoch_and_the_report_draws_them(tmp_path, capsys):
    from mlflow import MlflowClient

    from orchestrator.cli import main
    from orchestrator.report.collect import MECHANISM_METRICS, REPORT_METRICS, collect
    from orchestrator.sweep.expand import expand
    from orchestrator.sweep.file import load_sweep

    sweep = write_sweep(tmp_path / "s.yaml", "none: {weight_decay: 0.0}\n'01': {weight_decay: [0.0001, 0.0008]}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(sweep_cmd(sweep, uri, tmp_path / "runs"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    store = Store(uri)
    runs = store.active()
    assert len(runs) == 2
    decay = {}
    for run in runs.values():
        assert run["status"] == "FINISHED"
        store.assert_once_per_epoch(run["run_id"], 4)  # every metric, the diagnostics among them, once an epoch
        history = store.history(run["run_id"])
        decay[run["run_id"]] = [history[("decay_epochs", e)][0] for e in range(1, 5)]
        for name in DIAGNOSTICS:
            values = [history[(name, e)][0] for e in range(1, 5)]
            assert all(math.isfinite(v) and v > 0 for v in values), (name, values)
    # 100 images at batch 50: 2 steps an epoch; momentum 0.9; lr 0.1 then 0.01, 2 epochs each
    expected = {"none": [NO_DECAY] * 4, "01": [0.1 / (lr * wd * 2) for lr, wd in
                                              ((0.1, 1e-4), (0.1, 1e-4), (0.01, 8e-4), (0.01, 8e-4))]}
    scheme = dict(store.query("SELECT run_uuid, value FROM params WHERE key = 'scheme'"))
    got = {scheme[run_id]: values for run_id, values in decay.items()}
    assert got.keys() == expected.keys()
    assert got["none"] == expected["none"]
    assert got["01"] == pytest.approx(expected["01"], rel=1e-12)

    spec = load_sweep(sweep)
    col = collect(MlflowClient(uri), uri, spec, expand(spec), REPORT_METRICS + MECHANISM_METRICS)
    counts = col.frame.groupby(["scheme", "metric"], observed=True).size()
    assert counts.to_dict() == {(s, m): 4 for s in ("none", "01") for m in REPORT_METRICS + MECHANISM_METRICS}

    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(sweep), "--tracking-uri", uri, "--out", str(out)])
    _, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    stems = sorted(p.name for p in (out / "figures").iterdir())
    families = ("weight-decay", "other")  # 01; the scheme without decay
    assert stems == sorted(f"digits-resnet8-{f}{m}.{ext}" for f in families for m in ("", "-mechanism")
                           for ext in ("png", "pdf"))
    report_md = (out / "report.md").read_text()
    for family in families:
        png = Image.open(out / "figures" / f"digits-resnet8-{family}-mechanism.png")
        assert png.size[0] == round(160 * 4.4)  # one phase
        assert f"](figures/digits-resnet8-{family}-mechanism.png)" in report_md

    fast = tmp_path / "fast"
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(sweep), "--tracking-uri", uri, "--out", str(fast), "--no-mechanism"])
    assert exit_.value.code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (fast / "figures").iterdir()) == sorted(
        f"digits-resnet8-{f}.{ext}" for f in families for ext in ("png", "pdf"))
