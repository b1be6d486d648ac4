"""A pack spec with ``mode: streams`` (what ``--pack auto`` writes when its calibration measured solo models
on CUDA streams faster): the worker trains its members with ``training.streams`` (on the CPU one after
another), each its own MLflow run, each metric once per epoch, its checkpoint bit for bit its solo run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from e2e import Store

from orchestrator.run.folder import RunFolder
from orchestrator.run.spec import PackSpec, WorkerSpec
from training import RunConfig, train
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_a_streams_pack_trains_every_member_as_its_solo_run(tmp_path):
    configs = [RunConfig(arch="resnet8", dataset="digits", train_subset=100, lr=[0.1, 0.02], epochs_per_step=(1,),
                         grad_sparsity=0.0, weight_decay=1e-4 * (1 + s), seed=s) for s in range(2)]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    folders = [RunFolder(tmp_path / "runs" / f"k{i}") for i in range(2)]
    for c, folder in zip(configs, folders):
        WorkerSpec(config=c.to_dict(), experiment="streams", run_dir=str(folder.path), tracking_uri=uri,
                   device="cpu", threads=1).write(folder.spec)
    spec = tmp_path / "runs" / "packs" / "pack-test" / "spec.json"
    PackSpec("pack-test", [str(f.spec) for f in folders], 2, "streams").write(spec)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-P", "-m", "orchestrator.run.worker", str(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    store = Store(uri)
    runs = store.active()
    assert len(runs) == 2 and {r["status"] for r in runs.values()} == {"FINISHED"}
    for run in runs.values():
        store.assert_once_per_epoch(run["run_id"], 2)
    tags = store.query("SELECT value FROM tags WHERE key = 'adareg.pack'")
    assert sorted(v for (v,) in tags) == ["pack-test/2", "pack-test/2"]
    torch.set_num_threads(1)
    for c, folder in zip(configs, folders):
        solo = train(c, checkpoint_path=tmp_path / f"solo-{c.seed}.pt")
        mine = load_checkpoint(folder.checkpoint)
        assert mine["epoch"] == 2
        assert all(torch.equal(mine["model"][k], v) for k, v in solo.model.state_dict().items())
        assert [h["train_loss"] for h in mine["history"]] == [h["train_loss"] for h in solo.history]
