"""Where a run came from: adareg's version, the git commit (and whether the checkout had uncommitted changes)
where the code is a git checkout, and the command line. Tagged on every MLflow run a launch creates, beside
MLflow's own ``mlflow.source.*`` and ``mlflow.user`` tags; the resolved sweep file and the run's config are
logged as artifacts (``orchestrator.store.logger``)."""

from __future__ import annotations

import functools
import getpass
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.store.tags import (
    TAG_COMMAND,
    TAG_DIRTY,
    TAG_GIT_COMMIT,
    TAG_SOURCE_COMMIT,
    TAG_SOURCE_NAME,
    TAG_SOURCE_TYPE,
    TAG_USER,
    TAG_VERSION,
)

CODE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding the ``orchestrator`` and ``training`` packages: a checkout's root, or site-packages."""
MAX_TAG = 5000

_command: list[str] | None = None


def set_command(argv: Sequence[str]) -> None:
    """The command line being run, as its user typed it (``adareg``'s entry point calls this)."""
    global _command
    _command = ["adareg", *argv]


def command_line() -> str:
    """The command line that is running: what ``set_command`` was told, else this process's own."""
    return shlex.join(_command if _command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]])


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("adareg")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def git_state(root: Path = CODE_ROOT) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the code's git checkout (dirty: tracked files changed), or None when the code
    is not a checkout (an installed wheel) or git cannot tell."""
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode or status.returncode:
        return None
    return head.stdout.strip(), bool(status.stdout.strip())


def run_tags() -> dict[str, str]:
    """The provenance tags of a run started now by this process."""
    command = command_line()
    tags = {TAG_VERSION: version(), TAG_COMMAND: command[:MAX_TAG], TAG_SOURCE_TYPE: "LOCAL",
            TAG_SOURCE_NAME: command[:250]}
    try:
        tags[TAG_USER] = getpass.getuser()
    except (OSError, KeyError):
        pass
    git = git_state()
    if git is not None:
        commit, dirty = git
        tags.update({TAG_GIT_COMMIT: commit, TAG_DIRTY: str(dirty).lower(), TAG_SOURCE_COMMIT: commit})
    return tags
