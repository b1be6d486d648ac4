"""``sweep plan``, ``sweep status`` and ``report`` say which store they read, that it does not exist, and the
sweep's runs at other settings (issue 25, part 3)."""

from pathlib import Path

from tiny import TINY, adareg


def test_status_in_an_empty_folder_names_the_store_and_says_it_does_not_exist(isolated, capsys):
    Path("tiny.yaml").write_text(TINY)
    code, out, _ = adareg(capsys, "sweep", "status", "tiny.yaml")
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith(f"store sqlite:///{isolated}/mlflow.db, runs folder {isolated / 'runs'}"), first
    assert "no such store" in first and "nothing has been run here yet" in first
    code, out, _ = adareg(capsys, "sweep", "plan", "tiny.yaml")
    assert code == 0 and out.splitlines()[0] == first
    code, out, err = adareg(capsys, "report", "tiny.yaml")
    assert code == 2 and out.splitlines()[0].startswith(f"store sqlite:///{isolated}/mlflow.db: no such store")
    assert err.startswith("error: no MLflow store at") and err.count("\n") == 1
    assert not Path("mlflow.db").exists()


def test_runs_at_another_epochs_scale_are_named_with_their_flag(isolated, capsys):
    Path("tiny.yaml").write_text(TINY)
    code, out, err = adareg(capsys, "train", "--sweep", "tiny.yaml", "--arch", "resnet8", "--dataset", "digits",
                            "--scheme", "a", "--epochs-scale", "0.5", "--device", "cpu", "--threads", "1")
    assert code == 0, err
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(" phase 1 " in e and " elapsed, ETA " in e for e in epochs), out
    assert epochs[-1].endswith("elapsed, ETA 0s")
    last = out.splitlines()[-2:]  # the closing lines: where the run is and how to see it
    assert last[0].startswith(f"store sqlite:///{isolated}/mlflow.db, experiment 'adareg-tiny', run folder "), last
    assert last[1].startswith("view it: adareg ui") and ", then open http://127.0.0.1:5000/#/experiments/" in last[1]
    code, out, _ = adareg(capsys, "sweep", "status", "tiny.yaml")
    assert code == 0
    assert out.splitlines()[0].startswith(f"store sqlite:///{isolated}/mlflow.db, runs folder")
    assert "no such store" not in out
    assert "0/1 done" in out
    text = " ".join(out.split())
    assert ("the store also holds 1 run of sweep 'tiny' (1 finished) at other settings, not counted here: "
            "1 with --epochs-scale 0.5") in text, out
    code, out, _ = adareg(capsys, "sweep", "status", "tiny.yaml", "--epochs-scale", "0.5")
    assert "1/1 done" in out and "other settings" not in out  # the flag selects it
    code, out, err = adareg(capsys, "report", "tiny.yaml", "--out", "rep")
    assert code == 2 and out.startswith("store sqlite:///")
    assert err.count("\n") == 1 and err.startswith("error: no runs of sweep 'tiny' at these settings"), err
    assert "1 with --epochs-scale 0.5" in err
    code, out, err = adareg(capsys, "report", "tiny.yaml", "--out", "rep", "--epochs-scale", "0.5", "--no-mechanism")
    assert code == 0, err
    assert "other settings" not in err
