"""The GPU check's dry run on the CPU: `GPU_CHECK_DEVICE=cpu GPU_CHECK_BUDGET_S=60 bash benchmarks/gpu_check.sh`
runs with mlflow, pydantic, optuna and click made unimportable (as on the lent GPU machine, which has none
of the first three) and writes a JSON line naming every arch x precision x mode of the matrix."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("mlflow", "pydantic", "optuna", "click")
MODES = ("solo-eager", "solo-graphed", "pack4-graphed", "pack16-graphed", "pack48-graphed", "streams8-graphed",
         "streams16-graphed")


def test_the_dry_run_needs_only_torch_and_training(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    for name in BLOCKED:
        (shim / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in the GPU check')\n")
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_BUDGET_S": "60", "OUT": str(out),
           "GPU_CHECK_PYTHON": sys.executable, "PYTHONPATH": str(shim)}
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < 120, seconds
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.jsonl", "gpu_check.log"]
    lines = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "env" and kinds[-1] == "done"
    checks = {line["name"]: line for line in lines if line["kind"] == "check"}
    assert set(checks) == {"solo-resume", "solo-resume-graphed", "graphed-vs-eager", "pack2-vs-solo",
                           "streams2-vs-solo", "fashion-modes"}
    fashion = checks.pop("fashion-modes")
    assert all(c["passed"] for c in checks.values()), checks
    if fashion["passed"] is None:  # no Fashion-MNIST files here (CI installs them: there the check must run)
        assert not os.environ.get("CI") and "dataset-fashion-mnist" in fashion["skipped"], fashion
    else:
        assert fashion["passed"] and set(fashion["gap_to_eager"]) == {"graphed", "bf16", "pack-seed1", "pack-seed2"}
        assert all(0 < e < 0.9 for e in fashion["error"].values()), fashion  # trained, and better than chance
    assert checks["solo-resume"]["bitwise"] and checks["solo-resume-graphed"]["bitwise"]  # on the CPU: to the bit
    assert checks["streams2-vs-solo"]["bitwise"]
    rates = [line for line in lines if line["kind"] == "rate"]
    named = {(r["arch"], r["precision"], r["mode"]) for r in rates}
    assert named == {(a, p, m) for a in ("resnet14", "resnet32") for p in ("fp32", "tf32", "bf16") for m in MODES}
    assert len(rates) == len(named) == 42
    measured = [r for r in rates if "images_per_second" in r]
    assert {r["mode"] for r in measured} == set(MODES)  # the first block at least is measured in every mode
    for r in measured:
        assert r["images_per_second"] > 0 and r["arithmetic"].startswith("200 runs x 450 epochs x 50000 images")
        assert r["arithmetic"].endswith(f"= {r['grid_hours']:.2f} h")
    assert sum(line["kind"] == "cost" for line in lines) == 6
