"""The wheel: built from a clean checkout, it carries the sweep files, and an installed adareg finds Table 1 and
the demo from a directory that is not the repository."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.mark.slow
def test_a_wheel_of_a_clean_checkout_ships_the_sweeps_and_runs_outside_the_repository(tmp_path):
    run("git", "clone", "--quiet", "--no-hardlinks", ROOT, tmp_path / "src", cwd=tmp_path)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
        tmp_path / "dist", tmp_path / "src", cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("adareg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.rsplit("/", 1)[-1] for n in names if n.startswith("orchestrator/sweep/files/"))
    assert shipped == sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml")) and "table1.yaml" in shipped

    # A venv of its own holding only the wheel; torch, mlflow & co. come from this interpreter's site-packages
    # (a path in a .pth file: the editable install of the checkout, a .pth of its own there, stays out).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp_path).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel,
        cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import orchestrator; print(orchestrator.__file__)", cwd=elsewhere).stdout
    assert where.startswith(str(site)), where  # the installed package, not the checkout

    adareg = venv / "bin" / "adareg"
    rows = run(adareg, "schedule", "01", "--format", "csv", cwd=elsewhere).stdout.splitlines()
    assert rows[0].startswith("epoch,phase,lr,weight_decay,grad_sparsity") and len(rows) == 451
    assert rows[101] == "101,1,0.001,0.0008,0", rows[101]  # Table 1's taper
    demo = run(adareg, "sweep", "show", "sweeps/demo.yaml", cwd=elsewhere).stdout
    assert demo.startswith(f"# {site}/orchestrator/sweep/files/demo.yaml, resolved\n"), demo
    assert "\nname: demo\n" in demo and "\n# 10 runs, 200 epochs in all\n" in demo, demo
    assert list(elsewhere.iterdir()) == []  # reading a shipped sweep writes nothing here
