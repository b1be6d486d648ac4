"""The study: its Optuna storage (a journal file or an RDB URL), its sampler and pruner, its fixed attributes,
and its one MLflow parent run."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from orchestrator.errors import BadValue, UserError, arg
from orchestrator.store.claims import SETTLE_S, created_first
from orchestrator.store.tags import TAG_NOTE, TAG_STUDY, TAG_STUDY_RUN
from orchestrator.sweep.schema import Sweep, TuneSpace
from orchestrator.tune.space import space_of

STUDY_ATTRS = ("objective", "validation", "seeds")  # fixed per study
DEFAULT_TRIAL_LEASE_S = 120.0
MAX_RETRY = 3


def default_storage(sweep: Sweep) -> str:
    return str(Path("adareg_tune") / f"{sweep.name}.journal")


def is_rdb(storage: str) -> bool:
    return "://" in storage


def open_storage(storage: str, *, create: bool = True, lease_s: float = DEFAULT_TRIAL_LEASE_S):
    """An Optuna storage: an RDB URL (with Optuna's heartbeat and retry of stale trials) or a journal file."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if is_rdb(storage):
        interval = max(1, int(lease_s / 4))
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)
        last: Exception | None = None
        for attempt in range(5):  # several tuners creating the tables of a fresh database at once
            try:
                return RDBStorage(storage, heartbeat_interval=interval, grace_period=max(interval + 1, int(lease_s)),
                                  heartbeat_stale_trial_callback=retry)
            except Exception as e:  # noqa: BLE001 - retried, then named
                last = e
                time.sleep(0.5 + attempt)
        raise BadValue(f"{arg('storage')} {storage}: {type(last).__name__}: {str(last).splitlines()[0][:300]}")
    path = Path(storage)
    if not create and not path.exists():
        raise UserError(f"{storage}: no such study journal (run 'adareg tune run FILE' first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return JournalStorage(JournalFileBackend(str(path)))


def process_seed(sampler_seed: int) -> int:
    """The sampler seed of this process: ``tune.sampler_seed`` mixed with a random number (the same seed in
    two tuners would make them propose the same tapers)."""
    return (sampler_seed * 1_000_003 + uuid.uuid4().int) % 2**32


def open_study(sweep: Sweep, storage: str | None, create: bool = True, lease_s: float = DEFAULT_TRIAL_LEASE_S,
               seed: int | None = None):
    """The sweep's study (named after the sweep) in a journal file or an RDB URL."""
    import optuna

    space = space_of(sweep)
    backend = open_storage(storage or default_storage(sweep), create=create, lease_s=lease_s)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if space.pruner == "median"
              else optuna.pruners.NopPruner())
    sampler = optuna.samplers.TPESampler(seed=process_seed(space.sampler_seed) if seed is None else seed,
                                         constant_liar=True)
    try:
        if create:
            study = optuna.create_study(storage=backend, study_name=sweep.name, direction="minimize",
                                        load_if_exists=True, pruner=pruner, sampler=sampler)
        else:
            study = optuna.load_study(storage=backend, study_name=sweep.name, pruner=pruner, sampler=sampler)
    except KeyError:
        raise UserError(f"{storage or default_storage(sweep)}: no study named {sweep.name!r}") from None
    if create:
        _check_study_attrs(study, space)
    return study


def _check_study_attrs(study, space: TuneSpace) -> None:
    """``tune.objective``, ``tune.validation`` and ``tune.seeds`` are fixed per study: values scored
    differently are not comparable."""
    have = study.user_attrs
    for name in STUDY_ATTRS:
        mine = getattr(space, name)
        if name not in have:
            study.set_user_attr(name, mine)
        elif have[name] != mine:
            raise UserError(f"tune.{name}: {mine!r}, but study {study.study_name!r} was run with {have[name]!r} "
                            "(trials scored differently cannot be compared: use another sweep name or storage)")


def heartbeat_enabled(storage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def study_run(client, experiment_id: str, study_name: str, settle_s: float = SETTLE_S) -> str:
    """The id of the study's MLflow run (tag ``adareg.study_run``), created if needed: trial runs are its
    children. Of runs created at once, the earliest (start time, id) wins; the others are deleted."""
    def find() -> list:
        return client.search_runs([experiment_id], filter_string=f"tags.`{TAG_STUDY_RUN}` = '{study_name}'",
                                  max_results=100)

    found = find()
    if not found:
        mine = client.create_run(experiment_id, run_name=f"study-{study_name}",
                                 tags={TAG_STUDY_RUN: study_name, TAG_STUDY: study_name,
                                       TAG_NOTE: f"Optuna study {study_name}: its trials' runs are nested "
                                                          "here (scored on a validation split)"})
        client.set_terminated(mine.info.run_id, status="FINISHED")
        time.sleep(settle_s)
        found = find()
        first = created_first(found or [mine])
        if first.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
        return first.info.run_id
    return created_first(found).info.run_id


def dashboard(sweep: Sweep, storage: str | None, port: int) -> None:
    """optuna-dashboard on the study's storage, bound to 127.0.0.1 (blocks until interrupted)."""
    try:
        import optuna_dashboard
    except ImportError:
        raise UserError("optuna-dashboard is not installed: pip install optuna-dashboard") from None
    backend = open_storage(storage or default_storage(sweep), create=False)
    optuna_dashboard.run_server(backend, host="127.0.0.1", port=port)

