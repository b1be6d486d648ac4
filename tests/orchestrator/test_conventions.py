"""One convention for sweep files on the command line (issue 25, part 4): ``--set`` changes keys that exist
(``+KEY=`` adds one), with did-you-mean on scheme names; ``sweep show`` prints the resolved file; each command
takes ``--set``, ``--only``, ``--epochs-scale``, ``--train-subset`` only where they mean something."""

from pathlib import Path

import yaml
from tiny import adareg

ROOT = Path(__file__).resolve().parents[2]
TABLE1 = str(ROOT / "sweeps" / "table1.yaml")
POW = """\
name: pow
experiment: adareg-pow
datasets: [digits]
archs: [resnet8]
seeds: [0, 1]
schemes:
  wd-pow: {weight_decay: {taper: power, ref: 0.0001, ref_lr: 0.1, alpha: 0.5}}
  wd-1e-4: {weight_decay: 0.0001}
"""



def test_a_set_typo_of_a_scheme_name_is_one_error_line_with_did_you_mean(isolated, capsys):
    Path("pow.yaml").write_text(POW)
    for command in (["sweep", "plan"], ["sweep", "run"], ["sweep", "show"]):
        code, out, err = adareg(capsys, *command, "pow.yaml", "--set", "schemes.wdpow.weight_decay=0.001")
        assert code == 2 and out == "", out
        assert err == ("error: --set 'schemes.wdpow.weight_decay=0.001': schemes has no scheme 'wdpow' (did you "
                       "mean 'wd-pow'?) (it has wd-pow, wd-1e-4); to add it, write +schemes.wdpow.weight_decay=...\n")
    code, _, err = adareg(capsys, "sweep", "plan", "pow.yaml", "--set", "schemes.wd-pow.weight_decay.alpah=1")
    assert code == 2 and "schemes.wd-pow.weight_decay has no key 'alpah' (did you mean 'alpha'?)" in err
    code, _, err = adareg(capsys, "sweep", "plan", "pow.yaml", "--set", "train.momentun=0.8")
    assert code == 2 and err.count("\n") == 1 and "train has no key 'momentun' (did you mean 'momentum'?)" in err
    assert not Path("mlflow.db").exists()


def test_set_changes_keys_the_schema_knows_and_plus_adds(isolated, capsys):
    Path("pow.yaml").write_text(POW)
    code, out, err = adareg(capsys, "sweep", "plan", "pow.yaml", "--set", "train.momentum=0.8",  # a default
                            "--set", "+schemes.wd-2e-4.weight_decay=0.0002", "--format", "json")
    assert code == 0, err
    assert "wd-2e-4" in out and out.count('"momentum": 0.8') == 6  # 3 schemes x 2 seeds


def test_sweep_show_prints_the_resolved_file_and_counts(isolated, capsys):
    Path("pow.yaml").write_text(POW)
    code, out, err = adareg(capsys, "sweep", "show", "pow.yaml", "--set", "train.momentum=0.8",
                            "--epochs-scale", "0.02", "--only", "seed=0")
    assert code == 0, err
    assert out.startswith("# pow.yaml, resolved --set train.momentum=0.8 --only seed=0 --epochs-scale 0.02\n")
    doc = yaml.safe_load(out)  # the comments aside, a sweep file
    assert doc["train"]["momentum"] == 0.8 and doc["train"]["epochs_scale"] == 0.02
    assert doc["schedule"]["epochs_per_step"] == [50, 20, 20]  # the default, filled in
    assert "# 2 runs, 30 epochs in all\n" in out
    assert "#   wd-pow: 1 run x 15 epochs; lr=[0.1,0.01,0.001,0.0001,1e-05] weight_decay=[0.0001," in out
    assert "#   wd-1e-4: 1 run x 15 epochs; lr=[0.1,0.01,0.001,0.0001,1e-05] weight_decay=0.0001 " in out
    assert not Path("mlflow.db").exists()


def test_schedule_and_train_take_set_and_tune_dashboard_takes_no_selection(isolated, capsys):
    code, out, err = adareg(capsys, "schedule", "01", "--sweep", TABLE1, "--set", "schemes.01.weight_decay=0.5",
                            "--epochs-scale", "0.02", "--format", "csv")
    assert code == 0, err
    rows = out.splitlines()
    assert rows[0].startswith("epoch,phase,lr,weight_decay") and len(rows) == 16
    assert {r.split(",")[3] for r in rows[1:]} == {"0.5"}
    for flag in ("--only", "--epochs-scale", "--train-subset"):
        code, _, err = adareg(capsys, "tune", "dashboard", TABLE1, flag, "1")
        assert code == 2 and f"No such option '{flag}'" in err, err
    code, _, err = adareg(capsys, "tune", "run", TABLE1, "--only", "seed=0")
    assert code == 2 and "No such option '--only'" in err
    code, _, err = adareg(capsys, "train", "--arch", "resnet8", "--dataset", "digits", "--scheme", "01",
                          "--sweep", TABLE1, "--set", "schemes.1.weight_decay=0.5")
    assert code == 2 and "schemes has no scheme '1'" in err
