"""The paper's figures with seed bands: one figure per dataset x arch x scheme family, phases as
columns, metrics as rows, the mean over seeds as a line and the best-worst seed as a band."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.lines

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator, PercentFormatter  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from training.config import RunConfig  # noqa: E402
from training.schedules import EpochPlan, phase_bounds  # noqa: E402

FAMILIES = {  # family -> (its schemes, the reference drawn with them)
    "weight-decay": (("01", "02", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"), None),
    "sparsity": (("21", "22", "23"), "wd-1e-4"),  # the paper holds weight decay at 1e-4 for these
}
FAMILY_TITLES = {"weight-decay": "weight decay", "sparsity": "gradient sparsity", "other": "other schemes"}
PAPER_FIGURES = {
    ("resnet14", "cifar10", "weight-decay"): 1,
    ("resnet32", "cifar10", "weight-decay"): 2,
    ("resnet14", "cifar100", "weight-decay"): 3,
    ("resnet32", "cifar100", "weight-decay"): 4,
    ("resnet32", "cifar10", "sparsity"): 5,
    ("resnet14", "cifar100", "sparsity"): 6,
}
ARCH_NAMES = {"resnet14": "Shallow Resnet", "resnet32": "Resnet"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "digits"}
FIGURE_METRICS = ("test_loss", "test_error")
METRIC_LABELS = {"test_loss": "test loss", "test_error": "test error", "train_loss": "train loss",
                 "train_error": "train error"}
DPI = 160


@dataclass(frozen=True)
class FigureSpec:
    """One figure: the schemes of a family (with the baseline where the family compares to it)."""

    dataset: str
    arch: str
    family: str
    schemes: tuple[str, ...]
    paper: int | None = None

    @property
    def stem(self) -> str:
        prefix = f"fig{self.paper}-" if self.paper else ""
        return f"{prefix}{self.dataset}-{self.arch}-{self.family}"

    @property
    def title(self) -> str:
        arch = f"{ARCH_NAMES[self.arch]} ({self.arch})" if self.arch in ARCH_NAMES else self.arch
        what = f"{arch}, {DATASET_NAMES.get(self.dataset, self.dataset)}, {FAMILY_TITLES[self.family]}"
        return f"Fig {self.paper} of the paper: {what}" if self.paper else f"{what} (not in the paper)"


def figure_specs(present: pd.DataFrame, scheme_order: Sequence[str], baseline: str | None) -> list[FigureSpec]:
    """The figures for the dataset x arch x family combinations in ``present`` (dataset, arch,
    scheme rows of the runs that logged something), paper figures first, then in sweep order."""
    order = {s: i for i, s in enumerate(scheme_order)}
    specs = []
    for (dataset, arch), g in present.groupby(["dataset", "arch"], sort=False):
        have = sorted(set(g["scheme"]), key=lambda s: (order.get(s, len(order)), s))
        for family, schemes in family_members(have, baseline).items():
            specs.append(FigureSpec(dataset, arch, family, schemes, PAPER_FIGURES.get((arch, dataset, family))))
    return sorted(specs, key=lambda s: (s.paper is None, s.paper or 0))


def family_members(schemes: Sequence[str], baseline: str | None) -> dict[str, tuple[str, ...]]:
    """Family -> the schemes of its figure among ``schemes`` (in their order), with its reference.

    Schemes of no family (and references shown nowhere else) go to 'other', with ``baseline``.
    Families with none of their own schemes are left out.
    """
    out = {}
    for family, (members, reference) in FAMILIES.items():
        if any(s in members for s in schemes):
            out[family] = tuple(s for s in schemes if s in members or s == reference)
    shown = {s for members in out.values() for s in members}
    rest = [s for s in schemes if s not in shown and s != baseline]
    if rest or (schemes and not shown):
        out["other"] = tuple(s for s in schemes if s in rest or s == baseline)
    return out


def scheme_palette(schemes: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A fixed colour per scheme of the sweep (file order), the same in every figure."""
    colours = sns.color_palette("tab10" if len(schemes) <= 10 else "husl", len(schemes))
    return dict(zip(schemes, colours))


def seed_bands(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per dataset, arch, scheme, metric and epoch: the mean, lowest and highest value over the
    seeds that logged a number (not NaN) for that epoch, and their number n."""
    f = frame[frame["metric"].isin(metrics)]
    keys = ["dataset", "arch", "scheme", "metric", "epoch", "phase"]
    out = f.groupby(keys, observed=True, sort=True)["value"].agg(["mean", "min", "max", "count"])
    return out.rename(columns={"min": "best", "max": "worst", "count": "n"}).reset_index()


def describe(cfg: RunConfig) -> str:
    """A short label of a scheme's steps in its first phase, e.g. 'wd 1e-4→8e-4→1.6e-3' (with
    'in phase 1' where later phases differ)."""
    def steps(grid, fmt) -> str:
        row = grid[0]
        seen = [v for i, v in enumerate(row) if i == 0 or v != row[i - 1]]
        return "→".join(fmt(v) for v in seen) + ("" if all(r == row for r in grid) else " in phase 1")

    label = "wd " + steps(cfg.weight_decay, short)
    if any(v for row in cfg.grad_sparsity for v in row):
        label += ", sparsity " + steps(cfg.grad_sparsity, lambda v: f"{v:.0%}")
    return label


def short(v: float) -> str:
    """1e-4, 8e-4, 1.6e-3, 0: compact scientific notation."""
    if v == 0:
        return "0"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def draw(spec: FigureSpec, bands: pd.DataFrame, plans: dict[str, Sequence[EpochPlan]],
         labels: dict[str, str], palette: dict, metrics: Sequence[str] = FIGURE_METRICS,
         baseline: str | None = None) -> Figure:
    """The figure of ``spec``: a row per metric, a column per phase.

    ``bands`` is seed_bands' frame, ``plans`` each scheme's epoch plan (its learning-rate steps
    are marked), ``labels`` each scheme's legend text; the baseline is drawn dashed.
    """
    b = bands[(bands["dataset"] == spec.dataset) & (bands["arch"] == spec.arch)]
    bounds = phase_bounds(plans[spec.schemes[0]])
    steps = lr_steps(plans[spec.schemes[0]])
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        legend_rows = -(-len(spec.schemes) // 3)
        top, bottom = 0.95, 0.65 + 0.25 * legend_rows  # inches: title lines; x label and legend rows
        width, height = 4.4 * len(bounds), 2.3 * len(metrics) + top + bottom
        fig = Figure(figsize=(width, height))  # fixed margins: a layout engine would double the drawing time
        axes = fig.subplots(len(metrics), len(bounds), squeeze=False, gridspec_kw=dict(
            left=0.8 / width, right=1 - 0.15 / width, top=1 - top / height, bottom=bottom / height,
            wspace=0.2, hspace=0.18))
        for r, metric in enumerate(metrics):
            for c, (phase, (first, last)) in enumerate(sorted(bounds.items())):
                ax = axes[r, c]
                for scheme in spec.schemes:
                    d = b[(b["scheme"] == scheme) & (b["metric"] == metric) & (b["phase"] == phase)]
                    if d.empty:
                        continue
                    colour = palette[scheme]
                    ax.fill_between(d["epoch"], d["best"], d["worst"], color=colour, alpha=0.18, lw=0)
                    ax.plot(d["epoch"], d["mean"], color=colour, lw=1.5, ls="--" if scheme == baseline else "-")
                ax.grid(False, axis="x")  # the learning-rate steps are the vertical guides
                mark_lr_steps(ax, [(e, lr) for e, lr in steps if first <= e <= last], label=r == 0)
                ax.set_xlim(first - 0.5, last + 0.5)
                if metric.endswith("loss"):
                    log_axis(ax)
                else:
                    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=None))
                if r == 0:
                    ax.set_title(f"phase {phase} (epochs {first}–{last})", pad=14)
                if c == 0:
                    ax.set_ylabel(METRIC_LABELS.get(metric, metric) + (" (log)" if metric.endswith("loss") else ""))
                if r == len(metrics) - 1:
                    ax.set_xlabel("epoch")
        seeds = b[b["scheme"].isin(spec.schemes)].groupby("scheme", observed=True)["n"].max()
        most = int(seeds.max()) if len(seeds) else 0
        handles = [matplotlib.lines.Line2D([], [], color=palette[s], lw=2.5, ls="--" if s == baseline else "-")
                   for s in spec.schemes]
        texts = [labels[s] + ("" if seeds.get(s, 0) == most else f" ({int(seeds.get(s, 0))} of {most} seeds)")
                 for s in spec.schemes]
        fig.legend(handles, texts, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height),
                   ncol=min(3, len(spec.schemes)), frameon=False)
        fig.suptitle(f"{spec.title}\nline: mean of {most} seeds, band: best to worst seed, "
                     "dotted: learning-rate steps (rate on top)", fontsize="medium", y=1 - 0.05 / height, va="top")
    return fig


def lr_steps(plan: Sequence[EpochPlan]) -> list[tuple[int, float]]:
    """(first epoch, learning rate) of every learning-rate step."""
    return [(e.epoch, e.lr) for i, e in enumerate(plan) if i == 0 or (e.phase, e.step) != (plan[i - 1].phase,
                                                                                               plan[i - 1].step)]


def mark_lr_steps(ax, steps: list[tuple[int, float]], label: bool) -> None:
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (epoch, lr) in enumerate(steps):
        if i:
            ax.axvline(epoch - 0.5, color="0.55", lw=0.8, ls=":", zorder=0)
        if label:
            ax.text(epoch - 0.5, 1.01, f"{'lr ' if i == 0 else ''}{lr:g}", transform=trans, fontsize=6.5,
                    color="0.35", va="bottom")


def log_axis(ax) -> None:
    """A log y axis with plain tick labels (0.2, 0.5, 1): evenly spaced ticks when the data span
    less than a factor of 4, else 1-2-5 ticks per decade."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    narrow = hi / lo < 4
    ax.yaxis.set_major_locator(MaxNLocator(5, steps=[1, 2, 5, 10]) if narrow else LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_locator(NullLocator())


@dataclass(frozen=True)
class FigureJob:
    """Everything one figure needs (picklable, for a worker process)."""

    spec: FigureSpec
    bands: pd.DataFrame
    plans: dict[str, Sequence[EpochPlan]]
    labels: dict[str, str]
    palette: dict
    metrics: Sequence[str]
    baseline: str | None

    def __call__(self, out_dir: Path) -> list[Path]:
        fig = draw(self.spec, self.bands, self.plans, self.labels, self.palette, self.metrics, self.baseline)
        return save(fig, out_dir, self.spec.stem)


def render_all(jobs: Sequence[FigureJob], out_dir: Path, workers: int | None = None) -> list[list[Path]]:
    """Run the jobs, in ``workers`` forked processes where the platform forks (the PNG and PDF
    rendering is CPU-bound; a fork starts in milliseconds, a spawn would re-import everything)."""
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    workers = min(workers, len(jobs))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [job(out_dir) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(FigureJob.__call__, jobs, [out_dir] * len(jobs)))


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """PNG (DPI) and PDF beside each other, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "pdf"):
        path = out_dir / f"{stem}.{fmt}"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            # zlib level 3 instead of 6: a fifth less time for the whole figure, a tenth larger PNG
            fig.savefig(fh, format=fmt, dpi=DPI, **({"pil_kwargs": {"compress_level": 3}} if fmt == "png" else {}))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        paths.append(path)
    return paths
