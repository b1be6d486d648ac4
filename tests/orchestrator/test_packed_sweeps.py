"""Packed sweeps end to end (issue: packed training): the demo sweep packed and unpacked into two stores,
and a packed sweep SIGKILLed at random then resumed, equal to an uninterrupted packed run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from e2e import ADAREG, Store, assert_one_training_per_key, killed_at_random, sweep_cmd, write_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--only", "seed=0", "--epochs-scale", "0.02", "--train-subset", "100", "--set", "archs=[resnet8]"]


def test_the_demo_packed_and_unpacked_gives_the_same_runs(tmp_path):
    """``--pack 5`` and ``--pack off`` into two stores: every run FINISHED, each metric once per epoch, the same
    run keys, epoch-1 train_loss equal to 1e-3 relative; packed runs carry ``adareg.pack``."""
    demo = REPO / "sweeps" / "demo.yaml"
    stores = {}
    for pack in ("5", "off"):
        uri = f"sqlite:///{tmp_path}/{pack}.db"
        done = subprocess.run(sweep_cmd(demo, uri, tmp_path / f"runs-{pack}", *SMALL, "--pack", pack,
                                        "--max-parallel", "1"), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        stores[pack] = Store(uri)
    packed, solo = (stores[p].active() for p in ("5", "off"))
    assert sorted(packed) == sorted(solo) and len(packed) == 5
    for key in packed:
        for store, run in ((stores["5"], packed[key]), (stores["off"], solo[key])):
            assert run["status"] == "FINISHED"
            store.assert_once_per_epoch(run["run_id"], 15)
        (a,), (b,) = stores["5"].history(packed[key]["run_id"])[("train_loss", 1)], \
            stores["off"].history(solo[key]["run_id"])[("train_loss", 1)]
        assert abs(a - b) <= 1e-3 * abs(b), (key, a, b)
    tags = stores["5"].query("SELECT value FROM tags WHERE key = 'adareg.pack'")
    assert len(tags) == 5 and len({v for (v,) in tags}) == 1 and tags[0][0].endswith("/5")
    assert stores["off"].query("SELECT value FROM tags WHERE key = 'adareg.pack'") == []
    # the report of a packed sweep is the unpacked one's in form: the same files, columns and rows
    outs = {}
    for pack in ("5", "off"):
        outs[pack] = tmp_path / f"report-{pack}"
        done = subprocess.run([ADAREG, "report", str(demo), *SMALL, "--tracking-uri",
                               f"sqlite:///{tmp_path}/{pack}.db", "--out", str(outs[pack])], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    files = {pack: sorted(str(p.relative_to(out)) for p in out.rglob("*")) for pack, out in outs.items()}
    assert files["5"] == files["off"] and sum(f.endswith(".png") for f in files["5"]) == 4  # 2 + 2 mechanism
    for name in (f for f in files["5"] if f.endswith(".csv")):
        a, b = (pd.read_csv(outs[pack] / name) for pack in ("5", "off"))
        keys = [c for c in a.columns if not pd.api.types.is_numeric_dtype(a[c]) and c != "run_id"]  # scheme, metric
        assert list(a.columns) == list(b.columns) and len(keys) >= 3 and a[keys].equals(b[keys]), name


def test_a_packed_sweep_killed_at_random_resumes_to_the_uninterrupted_packed_result(tmp_path):
    """``--pack 5`` over 6 runs (a pack of 5, a run alone): the orchestrator SIGKILLed alone or with its
    workers at 5 random moments, restarted each time, then run to the end: exactly one MLflow run per key,
    FINISHED, each metric once per epoch, none left RUNNING, every curve equal to an uninterrupted packed
    sweep's, bit for bit (whatever a kill split or finished, a member trains as in its pack)."""
    schemes = "wd-1e-4: {weight_decay: 0.0001}\n'01': {weight_decay: [0.0001, 0.0008]}\n"
    sweep = write_sweep(tmp_path / "s.yaml", schemes, seeds="[0, 1, 2]", epochs=4)
    ref_uri = f"sqlite:///{tmp_path}/ref.db"
    done = subprocess.run(sweep_cmd(sweep, ref_uri, tmp_path / "ref-runs", "--pack", "5"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ref = Store(ref_uri)
    reference = {key: ref.history(run["run_id"]) for key, run in ref.active().items()}
    tags = sorted(v for (v,) in ref.query("SELECT value FROM tags WHERE key = 'adareg.pack'"))
    assert len(reference) == 6 and len(tags) == 5 and tags[0].endswith("/5") and len(set(tags)) == 1

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    history = killed_at_random(tmp_path, sweep, uri, seed=int(time.time()) % 10_000, names="A",
                               extra=("--pack", "5"))
    try:
        assert_one_training_per_key(Store(uri), reference, 8)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{history}") from None
