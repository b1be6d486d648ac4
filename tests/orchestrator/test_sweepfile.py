"""Sweep files: loading, one-line errors that name the culprit, --set / --only, expansion."""

import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import flag, main
from orchestrator.cli.common import (
    load_selection,
    selection_options,
    sweep_file_argument,
    tracking_uri_option,
)
from orchestrator.errors import BadValue, UserError
from orchestrator.identity import run_key
from orchestrator.sweep.expand import expand, parse_only
from orchestrator.sweep.file import MAX_ERRORS, SHIPPED, load_sweep, locate, shipped_sweeps
from orchestrator.sweep.schema import Scheme, Sweep, TrainSettings
from training.config import RunConfig

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
INSTALLED = "installed with adareg: beyond, demo, fashion-anchor, table1, tune"


def test_adareg_train_logs_a_run_off_the_sweeps_grid_to_its_own_experiment():
    sweep = load_sweep(SWEEPS / "table1.yaml")
    assert sweep.for_run("resnet32", "cifar100", 4) is sweep  # one of Table 1's runs: adareg-table1 counts it
    for arch, dataset, seed in (("resnet8", "cifar10", 0), ("resnet14", "digits", 0), ("resnet14", "cifar10", 5)):
        adhoc = sweep.for_run(arch, dataset, seed)
        assert (adhoc.experiment, adhoc.name, adhoc.schemes) == ("adareg-train", "table1", sweep.schemes)
        assert "CIFAR" not in adhoc.description


def test_the_sweep_files_installed_with_adareg_are_the_repositorys(tmp_path, monkeypatch):
    """sweeps/ ships in the package (orchestrator/sweep/files): a missing sweeps/NAME.yaml or a bare NAME
    is the installed file; a path of the working directory wins; any other missing path stays missing."""
    assert shipped_sweeps() == sorted(p.name for p in SWEEPS.glob("*.yaml"))
    assert all((SHIPPED / n).read_bytes() == (SWEEPS / n).read_bytes() for n in shipped_sweeps())
    monkeypatch.chdir(tmp_path)
    for given in ("sweeps/table1.yaml", "table1", "table1.yaml"):
        assert locate(given) == SHIPPED / "table1.yaml", given
    assert load_sweep("demo").name == "demo"
    for missing in ("other/table1.yaml", "a/sweeps/table1.yaml", "sweeps/nope.yaml", "nope"):
        assert locate(missing) == Path(missing)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "table1.yaml").write_text((SWEEPS / "demo.yaml").read_text())
    assert locate("sweeps/table1.yaml") == Path("sweeps/table1.yaml")
    assert load_sweep("sweeps/table1.yaml").name == "demo"
TABLE1_TEXT = (SWEEPS / "table1.yaml").read_text()
TABLE1_SCHEMES = ["01", "02", "21", "22", "23", "wd-1e-4", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"]


@pytest.fixture
def table1(tmp_path):
    """A writable copy of table1.yaml; call with (old, new) to edit it first."""
    def write(old: str = "", new: str = "") -> Path:
        assert old in TABLE1_TEXT
        path = tmp_path / "x.yaml"
        path.write_text(TABLE1_TEXT.replace(old, new, 1) if old else TABLE1_TEXT)
        return path
    return write


def error_of(call, *args, **kwargs) -> str:
    """The one-line error of ``call`` as the command line shows it (arguments spelled as their flags, as
    before the library learnt to name its arguments: these messages are unchanged for the user)."""
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    e = info.value
    message = e.spelled(flag) if isinstance(e, BadValue) else str(e)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------ the files


def test_table1_expands_to_200_runs_in_order():
    sweep = load_sweep(SWEEPS / "table1.yaml")
    assert (sweep.name, sweep.experiment) == ("table1", "adareg-table1")
    assert list(sweep.schemes) == TABLE1_SCHEMES
    planned = expand(sweep)
    assert len(planned) == 200
    assert [p.key for p in planned] == [run_key(p.config) for p in planned]  # planned once, keys with it
    assert {p.total_epochs for p in planned} == {450}
    runs = [p.config for p in planned]
    order = [(r.dataset, r.arch, r.scheme, r.seed) for r in runs]
    assert order == [(d, a, s, seed) for d in ("cifar10", "cifar100") for a in ("resnet14", "resnet32")
                     for s in TABLE1_SCHEMES for seed in range(5)]
    first = runs[0]
    assert (first.batch_size, first.momentum, first.augment, first.label_noise, first.epochs_scale,
            first.train_subset) == (50, 0.9, True, 0.0, 1.0, 0)
    assert first.data_dir == RunConfig().data_dir  # null data_dir = RunConfig's default


def test_demo_sweep():
    runs = [p.config for p in expand(load_sweep(SWEEPS / "demo.yaml"))]
    assert [(r.scheme, r.seed) for r in runs] == [(s, seed) for s in ("01", "02", "wd-1e-4", "wd-8e-3", "22")
                                                  for seed in (0, 1)]
    assert {(r.dataset, r.arch, r.label_noise, r.epochs_scale, r.train_subset) for r in runs} == {
        ("digits", "resnet14", 0.3, 0.04, 900)}
    demo, table1 = load_sweep(SWEEPS / "demo.yaml"), load_sweep(SWEEPS / "table1.yaml")
    assert all(demo.schemes[name] == table1.schemes[name] for name in demo.schemes)


def test_train_settings_are_run_config_fields():
    """``train:`` takes every RunConfig field that the grid, schedule and schemes do not set, generically."""
    grid = {"arch", "dataset", "seed", "scheme", "lr", "epochs_per_step", "weight_decay", "grad_sparsity",
            "lr_family", "lr_min", "warmup_epochs", "weight_decay_mode", "dropout", "label_smoothing", "batch_sizes",
            "per_epoch"}  # issue 15: set by schedule.lr's family and the schemes
    assert set(TrainSettings.model_fields) == {f.name for f in dataclasses.fields(RunConfig)} - grid
    assert all(f.description for model in (Sweep, Scheme, TrainSettings) for f in model.model_fields.values())
    assert TrainSettings.model_fields["momentum"].description == "SGD momentum."
    assert TrainSettings.model_fields["data_dir"].default is None
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name in TrainSettings.model_fields}
    assert {k: v for k, v in TrainSettings().model_dump().items() if k != "data_dir"} == {
        k: v for k, v in defaults.items() if k != "data_dir"}


def test_every_train_setting_reaches_the_run_config(table1):
    sweep = load_sweep(table1("  momentum: 0.9", "  momentum: 0.5\n  eval_batch_size: 123"))
    config = sweep.run_config("01", "resnet14", "digits", 0)
    assert (config.momentum, config.eval_batch_size) == (0.5, 123)


def test_scheme_lr_overrides_the_schedule(table1):
    sweep = load_sweep(table1('wd-8e-3: {weight_decay: 0.008, grad_sparsity: 0.0}',
                              'wd-8e-3: {weight_decay: 0.008, lr: 0.05}'))
    assert sweep.run_config("wd-8e-3", "resnet14", "digits", 0).lr == ((0.05,) * 5,) * 3
    assert sweep.run_config("wd-4e-3", "resnet14", "digits", 0).lr[0] == (0.1, 0.01, 0.001, 0.0001, 0.00001)


def test_run_config_unknown_scheme():
    sweep = load_sweep(SWEEPS / "table1.yaml")
    message = error_of(sweep.run_config, "wd-1e4", "resnet14", "cifar10", 0)
    assert "unknown scheme 'wd-1e4'" in message and "did you mean 'wd-1e-4'" in message
    assert "01, 02, 21, 22, 23, wd-1e-4" in message


# ------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("old, new, where, says", [
    ("train:", "trian:", "trian", "unknown key (did you mean 'train'?)"),
    ("    grad_sparsity: 0.0\n  \"02\"", "    grad_sparsty: 0.0\n  \"02\"", "schemes.01.grad_sparsty",
     "unknown key (did you mean 'grad_sparsity'?)"),
    ("  batch_size: 50", "  batchsize: 50", "train.batchsize", "did you mean 'batch_size'?"),
    ("experiment: adareg-table1", "", "experiment", "required key missing"),
    ("[0.0001, 0.0001, 0.0008, 0.0016, 0.0016]", "[0.0001, 0.0001, -1, 0.0016, 0.0016]",
     "schemes.01.weight_decay[2]", "must be >= 0"),
    ("[0.0, 0.0, 0.8, 0.8, 0.8]", "[0.0, 0.0, 1.0, 0.8, 0.8]", "schemes.22.grad_sparsity[0][2]",
     "must be in [0, 1)"),
    ("wd-8e-3: {weight_decay: 0.008, grad_sparsity: 0.0}", "wd-8e-3: {weight_decay: 0.008, grad_sparsity: 1.0}",
     "schemes.wd-8e-3.grad_sparsity", "must be in [0, 1)"),
    ("epochs_scale: 1.0", "epochs_scale: 0", "train.epochs_scale", "must be > 0"),
    ("label_noise: 0.0", "label_noise: 1.5", "train.label_noise", "must be in [0, 1]"),
    ("batch_size: 50", "batch_size: fifty", "train.batch_size", "valid integer, got 'fifty'"),
    ("0.00001]   # per step", "-0.00001]   # per step", "schedule.lr[4]", "must be > 0"),
    ("epochs_per_step: [50, 20, 20]", "epochs_per_step: [50, 0, 20]", "schedule.epochs_per_step[1]",
     "positive integer"),
    ("archs: [resnet14, resnet32]", "archs: [resnet14, resnet33]", "archs[1]", "6n+2"),
    ("datasets: [cifar10, cifar100]", "datasets: [cifar10, imagenet]", "datasets[1]", "unknown dataset"),
    ("seeds: [0, 1, 2, 3, 4]", "seeds: [0, 1, -2]", "seeds[2]", "non-negative"),
    ("seeds: [0, 1, 2, 3, 4]", "seeds: [0, 1, 2, 1]", "seeds[3]", "repeats 1 (already seeds[1])"),
    ("seeds: [0, 1, 2, 3, 4]", "seeds: 0", "seeds", "valid list"),
    ('"01":', "01:", "schemes", 'quote it (e.g. "01")'),
    ("name: table1", "name: my sweep", "name", "should match pattern"),
])
def test_validation_errors_name_file_and_field(table1, old, new, where, says):
    path = table1(old, new)
    message = error_of(load_sweep, path)
    assert message.startswith(f"{path}: {where}: "), message
    assert says in message


@pytest.mark.parametrize("old, new, below, says", [
    ("  batch_size: 50", "\tbatch_size: 50", 0, "indented with a tab"),
    ("archs: [resnet14, resnet32]", "archs: [resnet14, resnet32", 1, "while parsing a flow sequence from line {}"),
    ("  momentum: 0.9", "   momentum: 0.9", 0, "mapping values are not allowed"),
    ("name: table1", "name: table1\nname: again", 1, "duplicate key 'name' (first on line {})"),
])
def test_yaml_errors_name_file_and_line(table1, old, new, below, says):
    """``below``: how many lines under ``old``'s line the error is reported."""
    line = next(i for i, text in enumerate(TABLE1_TEXT.splitlines(), 1) if text.startswith(old))
    path = table1(old, new)
    message = error_of(load_sweep, path)
    assert message.startswith(f"{path}: line {line + below}, column "), message
    assert "invalid YAML" in message and says.format(line) in message


@pytest.mark.parametrize("text, says", [
    ("", "is empty"),
    ("- name: x\n", "expected a mapping of sweep settings at the top level, got list"),
])
def test_not_a_sweep(tmp_path, text, says):
    (tmp_path / "x.yaml").write_text(text)
    assert error_of(load_sweep, tmp_path / "x.yaml").startswith(f"{tmp_path / 'x.yaml'}: {says}")


def test_missing_file_and_directory(tmp_path):
    assert error_of(load_sweep, tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such file ({INSTALLED})"
    assert "is a directory" in error_of(load_sweep, tmp_path)


def test_numbers_in_exponent_form_are_numbers(table1):
    sweep = load_sweep(table1("wd-1e-3: {weight_decay: 0.001,", "wd-1e-3: {weight_decay: 1e-3,"))
    assert sweep.run_config("wd-1e-3", "resnet14", "cifar10", 0).weight_decay == ((0.001,) * 5,) * 3


# ------------------------------------------------------------------------------------ --set etc.


def test_set_overrides(table1):
    sweep = load_sweep(table1(), sets=["datasets=[digits]", "train.batch_size=100", "schedule.lr.0=0.2",
                                       "schemes.01.weight_decay=2e-4", "+schemes.new.weight_decay=0.03"])
    assert sweep.datasets == ["digits"]
    config = sweep.run_config("01", "resnet14", "digits", 0)
    assert config.batch_size == 100
    assert config.lr == ((0.2, 0.01, 0.001, 0.0001, 0.00001),) * 3
    assert config.weight_decay == ((2e-4,) * 5,) * 3
    assert list(sweep.schemes)[-1] == "new" and sweep.schemes["new"].weight_decay == 0.03
    assert len(expand(sweep)) == 1 * 2 * 11 * 5


def test_epochs_scale_and_train_subset_override(table1):
    sweep = load_sweep(table1(), sets=["train.epochs_scale=0.5"], epochs_scale=0.1, train_subset=500)
    assert (sweep.train.epochs_scale, sweep.train.train_subset) == (0.1, 500)
    message = error_of(load_sweep, table1(), epochs_scale=0)
    assert message.startswith(f"{table1()}: train.epochs_scale: must be > 0") and "(from --epochs-scale 0)" in message


@pytest.mark.parametrize("item, says", [
    ("foo", "--set 'foo': expected KEY=VALUE"),
    ("=3", "--set '=3': expected KEY=VALUE"),
    ("train..batch_size=3", "expected KEY=VALUE"),
    ("train.batch_size=[1", "--set 'train.batch_size=[1': VALUE is not valid YAML"),
    ("datasets.x=1", "--set 'datasets.x=1': datasets is a list of 2; 'x' is not an index into it"),
    ("name.x=1", "--set 'name.x=1': name is 'table1', not a mapping"),
])
def test_bad_set(table1, item, says):
    assert says in error_of(load_sweep, table1(), sets=[item])


def test_set_errors_after_validation_name_the_set(table1):
    path = table1()
    assert error_of(load_sweep, path, sets=["train.batch_size=0"]) == (
        f"{path}: train.batch_size: must be a positive integer, got 0 (from --set 'train.batch_size=0')")
    assert error_of(load_sweep, path, sets=["train.batchsize=3"]) == (
        "--set 'train.batchsize=3': train has no key 'batchsize' (did you mean 'batch_size'?)")  # before validation
    assert error_of(load_sweep, path, sets=["+train.batchsize=3"]) == (  # added: the schema refuses it
        f"{path}: train.batchsize: unknown key (did you mean 'batch_size'?) (from --set '+train.batchsize=3')")


def test_set_only_and_arch_select_exactly(table1):
    sweep = load_sweep(table1(), sets=["datasets=[digits]"])
    runs = [p.config for p in expand(sweep, only=["scheme=01,22", "arch=resnet14"])]
    assert [(r.dataset, r.arch, r.scheme, r.seed) for r in runs] == [
        ("digits", "resnet14", s, seed) for s in ("01", "22") for seed in range(5)]
    assert [p.config.seed for p in expand(sweep, only=["seed=3", "seed=0"])] == [0, 3] * 20
    assert len(expand(sweep, only=["epochs_scale=1", "augment=true", "scheme=23"])) == 10


def test_load_selection_and_options(table1):
    path = table1()
    seen = {}

    @click.command()
    @sweep_file_argument
    @selection_options
    @tracking_uri_option
    def command(sweep_file, set_, only, epochs_scale, train_subset, tracking_uri):
        sweep, runs = load_selection(sweep_file, set_, only, epochs_scale, train_subset)
        seen.update(sweep=sweep, runs=runs, uri=tracking_uri)

    result = CliRunner().invoke(command, [str(path), "--set", "datasets=[digits]", "--only", "scheme=01,22",
                                          "--only", "arch=resnet14", "--epochs-scale", "0.1", "--train-subset", "9"],
                                env={"MLFLOW_TRACKING_URI": "sqlite:///x.db"})
    assert result.exit_code == 0, result.output
    assert len(seen["runs"]) == 10 and seen["uri"] == "sqlite:///x.db"
    assert {(r.config.epochs_scale, r.config.train_subset) for r in seen["runs"]} == {(0.1, 9)}
    result = CliRunner().invoke(command, ["missing.yaml"], env={"MLFLOW_TRACKING_URI": None})
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == f"missing.yaml: no such file ({INSTALLED})"


@pytest.mark.parametrize("only, says", [
    (["scheme"], "--only 'scheme': expected FIELD=V1,V2"),
    (["scheme="], "--only 'scheme=': expected FIELD=V1,V2"),
    (["sceme=01"], "--only 'sceme=01': unknown field 'sceme' (did you mean 'scheme'?)"),
    (["weight_decay=0.001"], "--only 'weight_decay=0.001': unknown field"),
    (["scheme=01,zz"], "--only 'scheme=01,zz': no run has scheme zz"),
    (["arch=resnet14", "seed=0,9"], "--only 'seed=0,9': no run has seed 9 (the sweep has 0, 1, 2, 3, 4)"),
    (["dataset=digits"], "no run has dataset digits"),
])
def test_bad_only(only, says):
    assert says in error_of(expand, load_sweep(SWEEPS / "table1.yaml"), only)


def test_parse_only():
    assert parse_only(["scheme=01, 22", "seed=0", "scheme=23"]) == {"scheme": {"01", "22", "23"}, "seed": {"0"}}
    assert "expected FIELD=V1,V2" in error_of(parse_only, ["seed"])


def test_identical_schemes_are_refused(table1):
    sweep = load_sweep(table1(), sets=["+schemes.copy={weight_decay: 0.004}"])
    message = error_of(expand, sweep)
    assert message.startswith("schemes 'wd-4e-3' and 'copy' give identical runs (run key ")


# ------------------------------------------------------------------ several problems, one line


def test_a_typo_in_a_top_level_key_is_named(table1, isolated, capsys):
    """``sed 's/^seeds:/seedz:/' table1.yaml``: the unknown key is the error, not the missing 'seeds'."""
    path = table1("seeds: [0, 1, 2, 3, 4]", "seedz: [0, 1, 2, 3, 4]")
    assert error_of(load_sweep, path) == f"{path}: seedz: unknown key (did you mean 'seeds'?)"
    with pytest.raises(SystemExit) as e:
        main(["sweep", "plan", str(path)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err == f"error: {path}: seedz: unknown key (did you mean 'seeds'?)\n"


def test_a_missing_key_without_a_near_typo_is_still_reported(table1):
    path = table1("seeds: [0, 1, 2, 3, 4]", "colours: [red]")
    assert error_of(load_sweep, path) == f"{path}: colours: unknown key; seeds: required key missing"


def test_several_problems_are_listed_in_one_line(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(TABLE1_TEXT.replace("seeds:", "seedz:", 1).replace("  momentum: 0.9", "  momentun: 0.9", 1)
                    .replace("  batch_size: 50", "  batch_size: fifty", 1)
                    .replace("epochs_per_step: [50", "epochs_per_stepp: [50", 1))
    assert error_of(load_sweep, path) == (
        f"{path}: schedule.epochs_per_stepp: unknown key (did you mean 'epochs_per_step'?); "
        "train.momentun: unknown key (did you mean 'momentum'?); "
        "seedz: unknown key (did you mean 'seeds'?); "
        "train.batch_size: input should be a valid integer, got 'fifty'")


def test_every_bad_value_is_named(table1, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(TABLE1_TEXT.replace("label_noise: 0.0", "label_noise: 2", 1)
                    .replace("archs: [resnet14, resnet32]", "archs: [resnet14, resnet33]", 1)
                    .replace("seeds: [0, 1, 2, 3, 4]", "seeds: [0, -1]", 1))
    message = error_of(load_sweep, path)
    assert message.startswith(f"{path}: train.label_noise: must be in [0, 1], got 2")
    assert message.count("; ") == 2 and "; archs[1]: " in message and "; seeds[1]: must be a non-negative" in message
    wd = table1("[0.0001, 0.0001, 0.0008, 0.0016, 0.0016]", "[0.0001, 0.0001, -1, 0.0016, 0.0016]")
    wd.write_text(wd.read_text().replace("[0.0, 0.0, 0.8, 0.8, 0.8]", "[0.0, 0.0, 1.0, 0.8, 0.8]", 1))
    assert error_of(load_sweep, wd) == (f"{wd}: schemes.01.weight_decay[2]: must be >= 0, got -1.0; "
                                        "schemes.22.grad_sparsity[0][2]: must be in [0, 1), got 1.0")


def test_at_most_a_handful_are_listed(tmp_path):
    path = tmp_path / "x.yaml"
    extra = "".join(f"extra{i}: 1\n" for i in range(MAX_ERRORS + 2))
    path.write_text(TABLE1_TEXT + extra)
    message = error_of(load_sweep, path)
    assert message.count(": unknown key") == MAX_ERRORS
    assert message.endswith("extra4: unknown key (and 2 more errors)")


TUNE = "tune:\n  weight_decay_base: {low: 0.00001, high: 0.001, log: true}\n  grad_sparsity: 0.5\n"


@pytest.mark.parametrize("old, new, says", [
    ("weight_decay_base: {low:", "weight_decay_base: {lo:",
     "tune.weight_decay_base.lo: unknown key (did you mean 'low'?)"),
    ("weight_decay_base:", "weight_decay_bse:",
     "tune.weight_decay_bse: unknown key (did you mean 'weight_decay_base'?)"),
    ("grad_sparsity: 0.5", "grad_sparsity: lots", "tune.grad_sparsity: input should be a valid number, got 'lots'"),
    ("grad_sparsity: 0.5", "grad_sparsity: {low: 0.1, hihg: 0.5}",
     "tune.grad_sparsity.hihg: unknown key (did you mean 'high'?)"),
])
def test_did_you_mean_at_every_level_and_union_fields(tmp_path, old, new, says):
    path = tmp_path / "x.yaml"
    path.write_text(TABLE1_TEXT + TUNE.replace(old, new, 1))
    assert error_of(load_sweep, path) == f"{path}: {says}"


# ------------------------------------------------------------------------ bounded sweep files


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """"Billion laughs": each level a list of ``width`` aliases of the level below (width**levels values)."""
    names = "abcdefghijklmnop"[:levels]
    lines = [f"  a: &a [{', '.join(['0'] * width)}]"]
    lines += [f"  {n}: &{n} [{', '.join([f'*{p}'] * width)}]" for p, n in zip(names, names[1:])]
    return "\n".join(lines)


BOMB = TABLE1_TEXT.replace("seeds: [0, 1, 2, 3, 4]", "x-bomb:\n" + alias_bomb() + "\nseeds: *i", 1)
LIMIT_SAYS = "holds more than 100,000 values once YAML aliases (*name) are expanded (the limit for a sweep file)"


def test_an_alias_bomb_is_one_error_line(tmp_path, isolated, capsys):
    """Nine levels of ten aliases (10^9 values once expanded) in a 1 KB file: refused, not walked."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < len(TABLE1_TEXT) + 1024
    assert error_of(load_sweep, path) == f"{path}: {LIMIT_SAYS}"
    with pytest.raises(SystemExit) as e:
        main(["sweep", "plan", str(path)])
    out, err = capsys.readouterr()
    assert (e.value.code, out, err) == (2, "", f"error: {path}: {LIMIT_SAYS}\n")


def test_an_alias_bomb_costs_little_memory(tmp_path, isolated):
    """The real command on the bomb: one line, exit 2, and a small peak resident size (the acceptance asks
    < 200 MB; validating the bomb grew past gigabytes). Time is the README's figure, not asserted here."""
    import subprocess
    import sys

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    # the peak of this process's own memory (VmHWM; ru_maxrss would carry over the forking pytest's peak)
    code = ("import re, sys\nfrom orchestrator.cli import main\n"
            "try:\n    main(sys.argv[1:])\nfinally:\n"
            "    print('peak', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n")
    done = subprocess.run([sys.executable, "-c", code, "sweep", "plan", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"error: {path}: {LIMIT_SAYS}\n"
    peak_kb = int(done.stdout.split()[-1])
    assert peak_kb < 200 * 1024, peak_kb


def test_set_values_and_recursive_aliases_are_bounded(table1):
    path = table1()
    flow = "[&a [" + ", ".join(["0"] * 10) + "]" + "".join(
        f", &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdefgh", "bcdefghi")) + "]"
    item = f"seeds={flow}"
    assert error_of(load_sweep, path, sets=[item]) == f"--set {item!r}: {LIMIT_SAYS}"
    recursive = table1("seeds: [0, 1, 2, 3, 4]", "seeds: &s [0, *s]")
    assert error_of(load_sweep, recursive) == f"{recursive}: {LIMIT_SAYS}"


def test_the_limit_counts_expanded_values_not_text(table1, monkeypatch):
    """Just under the limit loads; one value more (here: one more seed) is refused."""
    import orchestrator.sweep.file as sweepfile

    path = table1()
    size = _expanded_size(__import__("yaml").safe_load(path.read_text()))
    monkeypatch.setattr(sweepfile, "MAX_NODES", size)
    load_sweep(path)
    says = f"holds more than {size:,} values once YAML aliases (*name) are expanded (the limit for a sweep file)"
    assert error_of(load_sweep, table1("seeds: [0, 1, 2, 3, 4]", "seeds: [0, 1, 2, 3, 4, 5]")) == (
        f"{table1()}: {says}")
    # each --set value is small, but together they push the document over the limit
    assert error_of(load_sweep, path, sets=["seeds=[0, 1, 2, 3, 4, 5]"]) == f"{path} with its --set values: {says}"


def _expanded_size(value) -> int:
    if isinstance(value, dict):
        return 1 + sum(_expanded_size(k) + _expanded_size(v) for k, v in value.items())
    if isinstance(value, list):
        return 1 + sum(_expanded_size(v) for v in value)
    return 1


def test_the_library_names_arguments_and_the_cli_names_flags(table1, capsys):
    """A notebook calling the library is told about its arguments, never about flags it did not pass."""
    with pytest.raises(UserError) as e:
        load_sweep(table1(), sets=["nonsense"])
    assert str(e.value).startswith("set 'nonsense': expected KEY=VALUE")
    with pytest.raises(UserError) as e:
        expand(load_sweep(table1()), only=["colour=red"])
    assert str(e.value).startswith("only 'colour=red': unknown field 'colour'")
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "plan", str(table1()), "--set", "nonsense", "--tracking-uri", "sqlite:///unused.db"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --set 'nonsense': expected KEY=VALUE (KEY dotted, e.g. " \
                                              "train.batch_size=100; +KEY=VALUE adds a key the file does not have)"
