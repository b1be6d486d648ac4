"""The mechanism figure of a report: does a taper act at all? Test loss and error beside each stage's weight
norm and effective step lr/‖w‖², and the weight-decay timescale (``training.diagnostics``' metrics)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.lines
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, PercentFormatter
from matplotlib.transforms import blended_transform_factory

from orchestrator.report.figures import FigureSpec, log_axis, lr_steps, mark_lr_steps
from training.callbacks import DIAGNOSTICS, NO_DECAY, STAGES
from training.schedules import EpochPlan, phase_bounds

MECHANISM_ROWS = (  # the rows of a mechanism figure: (y label, the metrics drawn in it)
    ("test loss", ("test_loss",)),
    ("test error", ("test_error",)),
    ("weight norm ‖w‖", tuple(f"weight_norm_{s}" for s in STAGES)),
    ("effective step lr/‖w‖²", tuple(f"effective_lr_{s}" for s in STAGES)),
    ("decay timescale (epochs)", ("decay_epochs",)),
)
DRAWN = tuple(dict.fromkeys(m for _, row in MECHANISM_ROWS for m in row))
"""The metrics a mechanism figure draws."""
STAGE_STYLES = {"stem": ":", "stage1": "-", "stage2": "--", "stage3": "-."}
STAGE_NAMES = {"stem": "first convolution", "stage1": "stage 1 (16 ch.)", "stage2": "stage 2 (32 ch.)",
               "stage3": "stage 3 (64 ch.)"}


def stage_in(metric: str) -> str | None:
    """The stage a per-stage diagnostic is of (``weight_norm_stage2`` -> ``stage2``), None for the others."""
    stage = metric.rsplit("_", 1)[-1]
    return stage if stage in STAGE_STYLES and metric.startswith(("weight_norm_", "effective_lr_")) else None


def has_mechanism(frame: pd.DataFrame) -> bool:
    """Whether the runs of ``frame`` logged the diagnostics (runs of older versions did not)."""
    return bool(frame["metric"].isin(DIAGNOSTICS).any())


def draw_mechanism(spec: FigureSpec, bands: pd.DataFrame, plans: dict[str, Sequence[EpochPlan]],
                   labels: dict[str, str], palette: dict) -> Figure:
    """The mechanism figure of ``spec``: whether a taper acts at all. A row per quantity (MECHANISM_ROWS): test
    loss and error, the weight norm and the effective step lr/‖w‖² of each stage's convolutions (a line style per
    stage), and the weight-decay timescale in epochs; all on log axes but the error, each line the mean over
    seeds of a scheme over every epoch (``bands``: seed_bands' frame of ``DRAWN``), the phases side by side on
    one epoch axis (solid lines between them; five panels, not one per phase: a panel's ticks and labels, not
    its lines, are what drawing costs). A timescale without decay (``NO_DECAY``) is infinite and not drawn."""
    b = bands[(bands["dataset"] == spec.dataset) & (bands["arch"] == spec.arch)]
    b = b.assign(mean=b["mean"].where(~((b["metric"] == "decay_epochs") & (b["mean"] >= NO_DECAY))))
    bounds = phase_bounds(plans[spec.schemes[0]])
    phases = sorted(bounds)
    first, last = bounds[phases[0]][0], bounds[phases[-1]][1]
    steps = lr_steps(plans[spec.schemes[0]])
    seeds = b[b["scheme"].isin(spec.schemes)].groupby("scheme", observed=True)["n"].max()
    lines = {key: d.sort_values("epoch", kind="stable")
             for key, d in b.groupby(["scheme", "metric"], observed=True, sort=False)}
    ncol = max(1, min(3, len(spec.schemes), int(4.4 * len(bounds) // (0.8 + 0.075 * max(
        len(labels[s]) for s in spec.schemes)))))
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        legend_rows = -(-len(spec.schemes) // ncol) + 1  # the schemes and the stage key
        top, bottom = 1.1, 0.65 + 0.25 * legend_rows
        width, height = 4.4 * len(bounds), 2.3 * len(MECHANISM_ROWS) + top + bottom
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(len(MECHANISM_ROWS), 1, sharex=True, squeeze=False, gridspec_kw=dict(
            left=0.8 / width, right=1 - 0.15 / width, top=1 - top / height, bottom=bottom / height,
            hspace=0.18))[:, 0]
        for r, (ylabel, metrics) in enumerate(MECHANISM_ROWS):
            ax = axes[r]
            drawn = False
            for scheme in spec.schemes:
                for metric in metrics:
                    d = lines.get((scheme, metric))
                    if d is not None and d["mean"].notna().any():
                        stage = stage_in(metric)
                        ax.plot(d["epoch"], d["mean"], color=palette[scheme], lw=1.5,
                                ls=STAGE_STYLES[stage] if stage else "-",
                                label=f"{scheme}: {metric}, mean of {int(d['n'].max())}")
                        drawn = True
            ax.grid(False, axis="x")
            mark_lr_steps(ax, steps, label=r == 0)
            for phase in phases[1:]:
                ax.axvline(bounds[phase][0] - 0.5, color="0.25", lw=1.0, zorder=0)
            ax.set_xlim(first - 0.5, last + 0.5)
            if metrics == ("test_error",):
                ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=None))
            elif drawn:
                decades_axis(ax)
            ax.set_ylabel(ylabel + ("" if metrics == ("test_error",) else " (log)"))
        trans = blended_transform_factory(axes[0].transData, axes[0].transAxes)
        for phase in phases:
            a, z = bounds[phase]
            axes[0].text((a + z) / 2, 1.0 + 0.3 / 2.3, f"phase {phase} (epochs {a}–{z})", transform=trans,
                         ha="center", va="bottom")
        axes[-1].set_xlabel("epoch")
        key = [(matplotlib.lines.Line2D([], [], color="0.3", ls=STAGE_STYLES[s], lw=1.5), STAGE_NAMES[s])
               for s in STAGES]
        row = 0.25 / height
        legend = fig.legend([h for h, _ in key], [t for _, t in key], loc="lower center", ncol=len(key),
                            bbox_to_anchor=(0.5, 0.02 / height + row * (legend_rows - 1)), frameon=False)
        fig.add_artist(legend)
        handles = [matplotlib.lines.Line2D([], [], color=palette[s], lw=2.5) for s in spec.schemes]
        fig.legend(handles, [labels[s] for s in spec.schemes], loc="lower center", bbox_to_anchor=(0.5, 0.02 / height),
                   ncol=ncol, frameon=False)
        most = int(seeds.max()) if len(seeds) else 0
        fig.suptitle(f"{spec.title}: does the taper act?\nmean of {most} seed{'s' if most != 1 else ''}; line style: "
                     "the stage (its convolutions, BatchNorm after each); solid: phases (warm restarts); dotted: "
                     "learning-rate steps", fontsize="medium", y=1 - 0.05 / height, va="top")
    return fig


def decades_axis(ax) -> None:
    """``log_axis``, with one tick per decade (or per few) where the data span more than two decades."""
    log_axis(ax)
    lo, hi = ax.get_ylim()
    if hi / lo > 100:
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
        ax.yaxis.set_major_formatter(FuncFormatter(decade_label))


def decade_label(v: float, _=None) -> str:
    """0.001, 1, 1000 and 10000 plainly; 1e-05, 1e+06 beyond."""
    return f"{v:g}" if 1e-3 <= v < 1e5 else f"{v:.0e}"


def mechanism_stem(spec: FigureSpec) -> str:
    return f"{spec.stem}-mechanism"
