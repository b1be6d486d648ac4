"""Every MLflow tag adareg writes or reads: one list, so a tag's name has one home."""

# identity (orchestrator.identity computes the keys)
TAG_RUN_KEY = "adareg.run_key"
TAG_GROUP_KEY = "adareg.group_key"
TAG_SWEEP = "adareg.sweep"
# how the last attempt ended (orchestrator.run.ending.End's words) and how many there were
TAG_FAILURE = "adareg.failure"  # "diverged" | "error" | "killed" | "pruned" | "stopped" | "store_down" | ""
TAG_FAILURE_REASON = "adareg.failure_reason"
TAG_ATTEMPTS = "adareg.attempts"
# ownership (orchestrator.store.claims)
TAG_OWNER = "adareg.owner"
TAG_HEARTBEAT = "adareg.heartbeat"
TAG_SUPERSEDED = "adareg.superseded"
TAG_SUPERSEDED_BY = "adareg.superseded_by"
# packs and tuning
TAG_PACK = "adareg.pack"  # "<pack id>/<size>" on every member's MLflow run
TAG_STUDY = "adareg.study"
TAG_TRIAL = "adareg.trial"
TAG_STUDY_RUN = "adareg.study_run"
# provenance (orchestrator.provenance): what made the run
TAG_VERSION = "adareg.version"
TAG_GIT_COMMIT = "adareg.git_commit"  # only where the code is a git checkout
TAG_DIRTY = "adareg.git_dirty"  # "true": the checkout had uncommitted changes to tracked files
TAG_COMMAND = "adareg.command"
# MLflow's own
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_SOURCE_COMMIT = "mlflow.source.git.commit"
TAG_USER = "mlflow.user"
TAG_PARENT = "mlflow.parentRunId"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
TAG_NOTE = "mlflow.note.content"
EXPERIMENT_KIND = "custom_model_development"  # the MLflow UI then opens on the runs table
