"""``RunLogger``: the training callback that mirrors one run into MLflow, under its claim.

It creates or claims the MLflow run only once training really starts (data loaded, checkpoint restored),
so bad input never leaves a run behind; while the store is down it keeps training, buffering epochs
(the checkpoint holds them anyway) and flushing them on recovery.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence

from orchestrator.errors import one_line
from orchestrator.identity import group_key, run_key
from orchestrator.store import claims
from orchestrator.store.client import Store, StoreDown, is_transient
from orchestrator.store.runs import active_runs, config_params, find_run, log_epochs, logged_history, produced_by
from orchestrator.store.tags import (
    TAG_ATTEMPTS,
    TAG_FAILURE,
    TAG_FAILURE_REASON,
    TAG_GROUP_KEY,
    TAG_RUN_KEY,
    TAG_SUPERSEDED_BY,
    TAG_SWEEP,
)
from training.callbacks import Callback, history_metrics
from training.config import RunConfig
from training.schedules import EpochPlan


class AlreadyFinished(Exception):
    """The key's run was finished (by another process) before this one could claim it."""

    def __init__(self, run_id: str):
        super().__init__(f"run {run_id} is already finished")
        self.run_id = run_id


class RunLogger(Callback):
    """Training callback that mirrors a run into MLflow under a claim.

    On start it finds the key's active run and claims it (Busy if a live process holds it), or creates it
    (Busy if a concurrent creator wins). A run whose logged history the checkpoint did not produce (no
    checkpoint, another training's, an older one) is superseded and a fresh run is started: a logged curve
    is always one training. Then it logs the epochs the checkpoint holds and MLflow lacks, and every new
    epoch once; a heartbeat thread keeps the claim alive. While the store is down, epochs are buffered and
    training goes on; after ``store.budget_s`` of outage ``StoreDown`` ends the run (resumable).
    """

    def __init__(self, store: Store, experiment_id: str, sweep: str | None = None, tags: dict[str, str] | None = None,
                 *, owner: claims.Owner, lease_s: float = claims.DEFAULT_LEASE_S,
                 note: Callable[[str], None] | None = None, seen: claims.Sightings | None = None,
                 sweep_yaml: str | None = None):
        self.store, self.experiment_id, self.sweep = store, experiment_id, sweep
        self.sweep_yaml = sweep_yaml  # the resolved sweep file, logged as an artifact beside config.json
        self.seen = seen  # the worker's sightings of other hosts' claims (kept in its run folder)
        self.tags = dict(tags or {})
        self.owner, self.lease_s = owner, lease_s
        self.note = note or (lambda message: None)
        self.run_id: str | None = None
        self.key: str | None = None  # the run's key, computed when the run is first looked for
        self.candidate = None  # the key's run as the worker found it, before claiming (see ``finish``)
        self.superseded: str | None = None  # why an earlier run of the key was superseded
        self.have: dict[str, set[int]] = {}
        self.pending: list[tuple[int, dict[str, float]]] = []
        self._stale_have = False
        self._down_since: float | None = None
        self._next_try = 0.0
        self._delay = 1.0
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None

    def existing(self, config: RunConfig):
        """The key's active run as it stands now (looked at before anything loads), or None."""
        return find_run(self.store.client, self.experiment_id, self._key(config))

    def _key(self, config: RunConfig) -> str:
        if self.key is None:
            self.key = run_key(config)
        return self.key

    # -- start: claim or create, never splice
    def attach(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        """Claim or create the key's run now (Busy, AlreadyFinished otherwise); ``on_start`` does it when
        this was not done before (a pack claims every member before it starts)."""
        self.store.call(lambda: self._attach(config, plan, history), "claiming the run")

    def on_start(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        if self.run_id is None:
            self.attach(config, plan, history)
        self.pending = [(int(entry["epoch"]), history_metrics(entry)) for entry in history]
        self._flush(blocking=True)
        self._beat = threading.Thread(target=self._heartbeat, name="adareg-heartbeat", daemon=True)
        self._beat.start()

    def _attach(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        client, key = self.store.client, self._key(config)
        run = find_run(client, self.experiment_id, key)
        if run is not None and run.info.status == "FINISHED":
            raise AlreadyFinished(run.info.run_id)
        if run is not None:
            run = claims.claim(client, run, self.owner, lease_s=self.lease_s, seen=self.seen)
            logged = logged_history(client, run)
            why = produced_by(logged, history) if any(logged.values()) else None
            if why is not None:
                self.superseded = (f"run {run.info.run_id} superseded: {why}; "
                                   + ("resuming the checkpoint in a new run" if history else "restarting from epoch 1"))
                claims.supersede(client, run, why)
                self.note(self.superseded)
                old, run = run, None
        if run is None:
            tags = {**self.tags, TAG_RUN_KEY: key, TAG_GROUP_KEY: group_key(config), TAG_ATTEMPTS: "1"}
            if self.sweep:
                tags[TAG_SWEEP] = self.sweep
            name = f"{config.scheme}-{config.arch}-{config.dataset}-s{config.seed}"
            run = claims.create_claimed(client, self.experiment_id, tags, name, self.owner,
                                        lambda: active_runs(client, self.experiment_id, key))
            self.run_id = run.info.run_id
            if self.superseded:
                client.set_tag(old.info.run_id, TAG_SUPERSEDED_BY, self.run_id)
            self.have = {}
        else:
            self.run_id = run.info.run_id
            attempts = int(run.data.tags.get(TAG_ATTEMPTS, "0") or 0) + 1
            client.update_run(self.run_id, status="RUNNING")
            client.set_tag(self.run_id, TAG_ATTEMPTS, str(attempts))
            _clear_tags(client, run, TAG_FAILURE, TAG_FAILURE_REASON)
            self.have = {name: set(steps) for name, steps in logged_history(client, run).items()}
        if not run.data.params:  # new, or killed between creating the run and logging its params
            self._log_params(config)

    def _log_params(self, config: RunConfig) -> None:
        """The config as params, and as artifacts (``config.json``, the resolved ``sweep.yaml``) for the record."""
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in config_params(config).items()]
        client = self.store.client
        client.log_batch(self.run_id, params=params, synchronous=True)
        try:
            client.log_dict(self.run_id, config.to_dict(), "config.json")
            if self.sweep_yaml:
                client.log_text(self.run_id, self.sweep_yaml, "sweep.yaml")
        except Exception as e:  # noqa: BLE001 - the run trains without its record; say so
            self.note(f"the run's config.json / sweep.yaml artifacts could not be stored: {one_line(e)}")

    # -- every epoch
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.pending.append((epoch, dict(metrics)))
        self._flush(blocking=False)

    def _flush(self, blocking: bool) -> None:
        """Log what MLflow lacks of the pending epochs (a step is never logged twice). Non-blocking while
        the store is down: the epochs wait for the next try; past the outage budget, StoreDown."""
        while self.pending:
            now = time.monotonic()
            if self._down_since is not None and now < self._next_try:
                if now - self._down_since >= self.store.budget_s:
                    raise StoreDown(f"tracking store {self.store.uri} unreachable for {now - self._down_since:.0f}s; "
                                    f"{len(self.pending)} epochs kept in the checkpoint")
                if not blocking:
                    return
                time.sleep(min(self._next_try - now, 1.0))
                continue
            try:
                self._log_pending()
            except Exception as e:  # noqa: BLE001 - transient ones are retried, the rest raised
                if not is_transient(e):
                    raise
                if self._down_since is None:
                    self._down_since = now
                    self.note(f"tracking store unreachable ({one_line(e)}); training goes on, epochs are buffered")
                self._next_try, self._delay = now + self._delay, min(self._delay * 2, 30.0)
                continue
            if self._down_since is not None:
                self.note(f"tracking store back after {now - self._down_since:.0f}s; buffered epochs logged")
            self._down_since, self._delay = None, 1.0

    def _log_pending(self) -> None:
        client = self.store.client
        if self._stale_have:
            if not claims.still_mine(client, self.run_id, self.owner):
                raise claims.Busy(f"run {self.run_id} was taken over by another process while the store was down")
            run = client.get_run(self.run_id)
            self.have = {name: set(steps) for name, steps in logged_history(client, run).items()}
            self._stale_have = False
        missing = []
        for epoch, metrics in self.pending:
            new = {k: v for k, v in metrics.items() if epoch not in self.have.get(k, ())}
            if new:
                missing.append((epoch, new))
        if missing:
            if not claims.still_mine(client, self.run_id, self.owner):
                raise claims.Busy(f"run {self.run_id} was taken over by another process")
            # Until the call is known to have returned, MLflow may hold its rows or not: a signal (SIGTERM, Ctrl-C)
            # that cuts it short after the server stored them must not make the run's end log them again (a
            # second row per step, which the next resume reads as another training's curve).
            self._stale_have = True
            log_epochs(client, self.run_id, missing)
            for epoch, new in missing:
                for k in new:
                    self.have.setdefault(k, set()).add(epoch)
            self._stale_have = False
        self.pending = []

    def _heartbeat(self) -> None:
        every = max(0.5, min(30.0, self.lease_s / 5))
        while not self._stop_beat.wait(every):
            with contextlib.suppress(Exception):  # a missed beat is retried; the lease is several beats long
                claims.beat(self.store.client, self.run_id)

    # -- the end
    def _end_orphan(self, run_id: str) -> None:
        """Stopped before claiming the key's run: a run left RUNNING by a dead worker is marked KILLED
        (resumable) unless a live process holds it now."""
        client = self.store.client
        run = client.get_run(run_id)
        h = claims.holder(run.data.tags, lease_s=self.lease_s, mine=self.owner, seen=self.seen)
        if run.info.status == "RUNNING" and (h is None or not h.live or h.owner.id == self.owner.id):
            client.set_terminated(run_id, status="KILLED")

    def abandon(self) -> None:
        """Stop heartbeating without touching the run: it is not, or no longer, this process's."""
        self._stop_beat.set()

    def finish(self, status: str, failure: str | None = None, reason: str | None = None,
               blocking: bool = True) -> None:
        """Log what is pending (waiting for the store up to its budget when ``blocking``), then end the run
        with ``status`` and give up the claim. No-op if the run was never created."""
        self._stop_beat.set()
        if self.run_id is None:
            if self.candidate is not None and status != "FINISHED":
                with contextlib.suppress(Exception):
                    self._end_orphan(self.candidate.info.run_id)
            return
        if blocking:
            self._flush(blocking=True)
        else:
            with contextlib.suppress(Exception):
                self._flush(blocking=False)

        def end() -> None:
            client = self.store.client
            if failure:
                client.set_tag(self.run_id, TAG_FAILURE, failure)
                if reason:
                    client.set_tag(self.run_id, TAG_FAILURE_REASON, reason[:4000])
            elif status == "FINISHED":
                _clear_tags(client, client.get_run(self.run_id), TAG_FAILURE, TAG_FAILURE_REASON)
            client.set_terminated(self.run_id, status=status)
            claims.release(client, self.run_id)

        if blocking:
            self.store.call(end, "ending the run")
        else:
            with contextlib.suppress(Exception):
                end()



def _clear_tags(client, run, *names: str) -> None:
    """Delete the run's tags ``names`` that it has (an empty tag is noise in the MLflow UI)."""
    for name in names:
        if name in run.data.tags:
            client.delete_tag(run.info.run_id, name)
