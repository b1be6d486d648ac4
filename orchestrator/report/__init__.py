"""``adareg report``: a sweep in MLflow turned into the paper's figures (mean, best run and worst run
per phase) and the paired statistics the paper lacks.

``collect.collect`` reads the runs in bulk into one long frame; ``stats.phase_summary`` and
``figures`` aggregate the seeds; ``render.write_report`` writes the report directory.
"""

from __future__ import annotations

from collections.abc import Sequence

WEIGHT_DECAY_SCHEMES = ("01", "02", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3")
"""The paper's weight-decay family (Figs 1-4)."""
SPARSITY_SCHEMES = ("21", "22", "23")
"""The paper's gradient-sparsity family (Figs 5-6), run at constant weight decay 1e-4."""
DEFAULT_BASELINES = {"weight-decay": ("wd-1e-3", "wd-8e-3"), "sparsity": ("wd-1e-4",)}
"""Family -> the schemes it is compared with by default: the paper makes its weight-decay claims
against constant 1e-3 and 8e-3; the sparsity schemes hold weight decay at 1e-4."""
TUNED_PREFIX = "tuned"
SELECTED_ON_VALIDATION = "selected on validation"


def is_tuned(scheme: str) -> bool:
    """A scheme found by ``adareg tune`` (named ``tuned`` or ``tuned...``): selected on a validation split."""
    return str(scheme).startswith(TUNED_PREFIX)


def family_of(scheme: str) -> str:
    """'sparsity' for 21/22/23, 'weight-decay' for every other scheme (for its default baselines)."""
    return "sparsity" if scheme in SPARSITY_SCHEMES else "weight-decay"


def comparison_plan(schemes: Sequence[str], baselines: Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Scheme -> the baselines it is compared with, among ``schemes`` (those with runs).

    Explicit ``baselines``: every scheme against each of them (not against itself). ``None``: the
    family's DEFAULT_BASELINES that have runs; a scheme none of whose defaults has runs is compared
    with the other default baselines that do (e.g. a tuned taper beside wd-1e-4 only).
    """
    present = list(dict.fromkeys(schemes))
    if baselines is not None:
        return {s: tuple(b for b in dict.fromkeys(baselines) if b != s and b in present) for s in present}
    every = [b for fam in DEFAULT_BASELINES.values() for b in fam]
    out = {}
    for s in present:
        mine = tuple(b for b in DEFAULT_BASELINES[family_of(s)] if b != s and b in present)
        out[s] = mine or tuple(b for b in every if b != s and b in present)
    return out
