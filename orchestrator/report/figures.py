"""The paper's figures: one figure per dataset x arch x scheme family, phases as columns, metrics as
rows; per scheme the mean over seeds and, as the paper shows them, the best and the worst run as
whole curves (chosen per phase by a stated criterion), optionally the per-epoch min-max envelope.
The paper's four named schemes keep the paper's colours; every other scheme has one of its own."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib
import matplotlib.lines
import matplotlib.patches

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator, PercentFormatter  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from orchestrator.report import SPARSITY_SCHEMES, WEIGHT_DECAY_SCHEMES  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.schedules import EpochPlan, phase_bounds  # noqa: E402

FAMILIES = {  # family -> (its schemes, the reference drawn with them)
    "weight-decay": (WEIGHT_DECAY_SCHEMES, None),
    "sparsity": (SPARSITY_SCHEMES, "wd-1e-4"),  # the paper holds weight decay at 1e-4 for these
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
                 "train_error": "train error", "decay_epochs": "decay timescale (epochs)"}
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


References = Mapping[str, Sequence[str]] | Sequence[str] | str | None


def figure_specs(present: pd.DataFrame, scheme_order: Sequence[str], references: References) -> list[FigureSpec]:
    """The figures for the dataset x arch x family combinations in ``present`` (dataset, arch,
    scheme rows of the runs that logged something), paper figures first, then in sweep order."""
    order = {s: i for i, s in enumerate(scheme_order)}
    specs = []
    for (dataset, arch), g in present.groupby(["dataset", "arch"], sort=False):
        have = sorted(set(g["scheme"]), key=lambda s: (order.get(s, len(order)), s))
        for family, schemes in family_members(have, references).items():
            specs.append(FigureSpec(dataset, arch, family, schemes, PAPER_FIGURES.get((arch, dataset, family))))
    return sorted(specs, key=lambda s: (s.paper is None, s.paper or 0))


def family_members(schemes: Sequence[str], references: References) -> dict[str, tuple[str, ...]]:
    """Family -> the schemes of its figure among ``schemes`` (in their order).

    A family's figure holds its own schemes, its FAMILIES reference and the baselines its schemes
    are compared with (``references``: scheme -> baselines, as comparison_plan gives; or baselines
    for every scheme). Schemes shown in no family figure go to 'other', with their baselines.
    Families with none of their own schemes are left out; every scheme is in some figure.
    """
    if references is None or isinstance(references, str) or not isinstance(references, Mapping):
        every = (references,) if isinstance(references, str) else tuple(references or ())
        references = {s: every for s in schemes}
    out = {}
    for family, (members, reference) in FAMILIES.items():
        mine = [s for s in schemes if s in members]
        if mine:
            wanted = set(mine) | {reference} | {b for s in mine for b in references.get(s, ())}
            out[family] = tuple(s for s in schemes if s in wanted)
    shown = {s for members in out.values() for s in members}
    rest = [s for s in schemes if s not in shown]
    if rest:
        wanted = set(rest) | {b for s in rest for b in references.get(s, ())}
        out["other"] = tuple(s for s in schemes if s in wanted)
    return out


PAPER_COLOURS = {  # the colours the paper's text names: 1e-3 red, 8e-3 magenta, 01 yellow, 02 cyan
    "wd-1e-3": "#e41a1c",  # red
    "wd-8e-3": "#d916d9",  # magenta
    "01": "#e0a30b",  # a gold yellow that reads on white
    "02": "#10b5d6",  # cyan, a shade darker than #00ffff
}
OTHER_COLOURS = (  # none of them red, magenta, yellow or cyan
    "#1f5fbf",  # blue
    "#2e9e3a",  # green
    "#f07c12",  # orange
    "#7a4bc2",  # purple
    "#8c5a3c",  # brown
    "#4d4d4d",  # dark grey
    "#0b2e6b",  # navy
    "#6b8e23",  # olive green
    "#1b9e77",  # teal green
    "#5f8fa8",  # slate blue-grey
    "#2f4f3f",  # dark green-grey
)
FIXED_COLOURS = {  # Table 1's other schemes: a fixed slot each
    "wd-1e-4": OTHER_COLOURS[5], "wd-2e-3": OTHER_COLOURS[0], "wd-4e-3": OTHER_COLOURS[1],
    "21": OTHER_COLOURS[2], "22": OTHER_COLOURS[3], "23": OTHER_COLOURS[4],
}


def scheme_palette(schemes: Sequence[str]) -> dict[str, str]:
    """A colour (hex) per scheme of the sweep, the same in every figure: PAPER_COLOURS for the
    paper's four named schemes, FIXED_COLOURS for Table 1's others, and for any other scheme the
    slot of OTHER_COLOURS its name hashes to, moved on to the next slot not taken by another scheme
    of ``schemes`` (a colour is reused only once all are taken)."""
    out = {s: PAPER_COLOURS.get(s) or FIXED_COLOURS[s] for s in schemes if s in PAPER_COLOURS or s in FIXED_COLOURS}
    taken = set(out.values())
    for s in sorted(s for s in dict.fromkeys(schemes) if s not in out):
        start = int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little") % len(OTHER_COLOURS)
        free = [OTHER_COLOURS[(start + i) % len(OTHER_COLOURS)] for i in range(len(OTHER_COLOURS))]
        out[s] = next((c for c in free if c not in taken), free[0])
        taken.add(out[s])
    return {s: out[s] for s in schemes}


def seed_bands(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per dataset, arch, scheme, metric and epoch: the mean, lowest and highest value over the
    seeds that logged a number (not NaN) for that epoch, and their number n."""
    f = frame[frame["metric"].isin(metrics)]
    keys = ["dataset", "arch", "scheme", "metric", "epoch", "phase"]
    out = f.groupby(keys, observed=True, sort=True)["value"].agg(["mean", "min", "max", "count"])
    return out.rename(columns={"min": "best", "max": "worst", "count": "n"}).reset_index()


RANK_METRICS = ("test_error", "test_loss")
PICK_COLUMNS = ["dataset", "arch", "scheme", "phase", "epoch", "n", "best_seed", "worst_seed"]


def pick_runs(frame: pd.DataFrame, bounds: pd.DataFrame, rank_by: str = "test_error") -> pd.DataFrame:
    """The best and the worst run of each dataset, arch, scheme and phase (PICK_COLUMNS): the runs
    with the lowest and the highest ``rank_by`` at the phase's last epoch (epoch), among the n runs
    that logged it; a diverged run (NaN) counts as the worst, a tie goes to the lowest seed. When no
    run has reached the phase's last epoch yet, the latest epoch of the phase that one has logged."""
    f = frame[frame["metric"] == rank_by]
    if f.empty:
        return pd.DataFrame(columns=PICK_COLUMNS)
    f = f.astype({c: str for c in ("group_key", "dataset", "arch", "scheme")}).merge(bounds, on=["group_key", "phase"])
    rows = []
    for (dataset, arch, scheme, phase), g in f.groupby(["dataset", "arch", "scheme", "phase"], sort=False):
        last = int(g["last"].iloc[0])
        epoch = last if (g["epoch"] == last).any() else int(g["epoch"].max())
        at = g[g["epoch"] == epoch].sort_values("seed", kind="stable")
        value = at["value"].fillna(float("inf")).to_numpy()
        seeds = at["seed"].to_numpy()
        rows.append((dataset, arch, scheme, phase, epoch, len(at), int(seeds[value.argmin()]),
                     int(seeds[value.argmax()])))
    return pd.DataFrame(rows, columns=PICK_COLUMNS)


def picked_curves(frame: pd.DataFrame, picks: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The rows of ``frame`` (of ``metrics``) that draw the picked runs: each picked run in its phase."""
    chosen = pd.concat([picks[["dataset", "arch", "scheme", "phase", s]].rename(columns={s: "seed"})
                        for s in ("best_seed", "worst_seed")]).drop_duplicates()
    f = frame[frame["metric"].isin(metrics)].astype({c: str for c in ("dataset", "arch", "scheme", "metric")})
    cols = ["dataset", "arch", "scheme", "seed", "metric", "epoch", "phase", "value"]
    return f.merge(chosen, on=["dataset", "arch", "scheme", "phase", "seed"])[cols]


def describe(cfg: RunConfig) -> str:
    """A short label of a scheme's steps in its first phase, e.g. 'wd 1e-4→8e-4→1.6e-3' (with
    'in phase 1' where later phases differ)."""
    def steps(grid, fmt) -> str:
        row = grid[0]
        seen = [v for i, v in enumerate(row) if i == 0 or v != row[i - 1]]
        return "→".join(fmt(v) for v in seen) + ("" if all(r == row for r in grid) else " in phase 1")

    label = ("decoupled " if cfg.weight_decay_mode == "decoupled" else "") + "wd " + steps(cfg.weight_decay, short)
    if cfg.lr_family != "step":
        label = f"{cfg.lr_family} lr, {label}"
    if any(v for row in cfg.grad_sparsity for v in row):
        label += ", sparsity " + steps(cfg.grad_sparsity, lambda v: f"{v:.0%}")
    for name, grid, fmt in (("dropout", cfg.dropout, lambda v: f"{v:.2g}"),
                            ("label smoothing", cfg.label_smoothing, lambda v: f"{v:.2g}"),
                            ("batch", cfg.batch_sizes, lambda v: f"{v:g}")):
        if grid is not None:
            label += f", {name} " + steps(grid, fmt)
    return label


def short(v: float) -> str:
    """1e-4, 8e-4, 1.6e-3, 0: compact scientific notation."""
    if v == 0:
        return "0"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


STYLE = {  # role -> line style and width
    "mean": ("-", 1.8),
    "best": ("--", 0.9),
    "worst": ("-.", 0.9),
}


def draw(spec: FigureSpec, bands: pd.DataFrame, plans: dict[str, Sequence[EpochPlan]],
         labels: dict[str, str], palette: dict, metrics: Sequence[str] = FIGURE_METRICS,
         picks: pd.DataFrame | None = None, curves: pd.DataFrame | None = None, rank_by: str = "test_error",
         envelope: bool = False) -> Figure:
    """The figure of ``spec``: a row per metric, a column per phase.

    ``bands`` is seed_bands' frame (the mean line; the min-max ``envelope`` when asked), ``picks``
    pick_runs' frame and ``curves`` picked_curves' rows (the best and worst run, whole curves in each
    phase), ``plans`` each scheme's epoch plan (its learning-rate steps are marked), ``labels`` each
    scheme's legend text. Every curve's label says what it is: '01: mean of 3 seeds',
    '01: best run (seed 2)', '01: worst run (seed 0)'.
    """
    b = bands[(bands["dataset"] == spec.dataset) & (bands["arch"] == spec.arch)]
    if picks is None:
        picks = pd.DataFrame(columns=PICK_COLUMNS)
    p = picks[(picks["dataset"] == spec.dataset) & (picks["arch"] == spec.arch)].set_index(["scheme", "phase"])
    c = curves if curves is not None else pd.DataFrame(columns=["scheme", "seed", "metric", "epoch", "phase", "value"])
    c = c[(c["dataset"] == spec.dataset) & (c["arch"] == spec.arch)] if "dataset" in c else c
    bounds = phase_bounds(plans[spec.schemes[0]])
    phases = sorted(bounds)
    steps = lr_steps(plans[spec.schemes[0]])
    rank_label = METRIC_LABELS.get(rank_by, rank_by)
    seeds = b[b["scheme"].isin(spec.schemes)].groupby("scheme", observed=True)["n"].max()
    most = int(seeds.max()) if len(seeds) else 0
    lines = {key: d for key, d in b.groupby(["scheme", "metric", "phase"], observed=True, sort=False)}
    runs = {key: d.sort_values("epoch") for key, d in c.groupby(["scheme", "seed", "metric", "phase"], observed=True,
                                                                 sort=False)}
    texts = []
    for s in spec.schemes:
        text = labels[s] + ("" if seeds.get(s, 0) == most else f" ({int(seeds.get(s, 0))} of {most} seeds)")
        best = [str(p.loc[(s, ph), "best_seed"]) if (s, ph) in p.index else "–" for ph in phases]
        worst = [str(p.loc[(s, ph), "worst_seed"]) if (s, ph) in p.index else "–" for ph in phases]
        if most > 1:
            text += f"; best run seed {'/'.join(best)}, worst run seed {'/'.join(worst)}"
        texts.append(text)
    # a legend column: the handle and gap (~0.8 in) and ~0.075 in a character at this font size
    ncol = max(1, min(3, len(spec.schemes), int(4.4 * len(bounds) // (0.8 + 0.075 * max(map(len, texts))))))
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        legend_rows = -(-len(spec.schemes) // ncol) + 1  # the schemes and the line-style key
        top, bottom = 0.95, 0.65 + 0.25 * legend_rows  # inches: title lines; x label and legend rows
        width, height = 4.4 * len(bounds), 2.3 * len(metrics) + top + bottom
        fig = Figure(figsize=(width, height))  # fixed margins: a layout engine would double the drawing time
        axes = fig.subplots(len(metrics), len(bounds), squeeze=False, gridspec_kw=dict(
            left=0.8 / width, right=1 - 0.15 / width, top=1 - top / height, bottom=bottom / height,
            wspace=0.2, hspace=0.18))
        for r, metric in enumerate(metrics):
            for col, phase in enumerate(phases):
                first, last = bounds[phase]
                ax = axes[r, col]
                for scheme in spec.schemes:
                    d = lines.get((scheme, metric, phase))
                    if d is None or d.empty:
                        continue
                    colour = palette[scheme]
                    if envelope:
                        ax.fill_between(d["epoch"], d["best"], d["worst"], color=colour, alpha=0.13, lw=0,
                                        label=f"{scheme}: min–max over seeds")
                    n = int(d["n"].max())
                    if (scheme, phase) in p.index and n > 1:
                        for role in ("worst", "best"):
                            seed = int(p.loc[(scheme, phase), f"{role}_seed"])
                            run = runs.get((scheme, seed, metric, phase), c.iloc[:0])
                            ls, lw = STYLE[role]
                            ax.plot(run["epoch"], run["value"], color=colour, ls=ls, lw=lw, alpha=0.8,
                                    label=f"{scheme}: {role} run (seed {seed})")
                    ls, lw = STYLE["mean"]
                    ax.plot(d["epoch"], d["mean"], color=colour, ls=ls, lw=lw,
                            label=f"{scheme}: mean of {n} seed{'s' if n != 1 else ''}")
                ax.grid(False, axis="x")  # the learning-rate steps are the vertical guides
                mark_lr_steps(ax, [(e, lr) for e, lr in steps if first <= e <= last], label=r == 0)
                ax.set_xlim(first - 0.5, last + 0.5)
                if metric.endswith("loss"):
                    log_axis(ax)
                else:
                    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=None))
                if r == 0:
                    # y given: matplotlib then skips measuring the tick labels to place it (a tenth of the drawing)
                    ax.set_title(f"phase {phase} (epochs {first}–{last})", pad=14, y=1.0)
                if col == 0:
                    ax.set_ylabel(METRIC_LABELS.get(metric, metric) + (" (log)" if metric.endswith("loss") else ""))
                if r == len(metrics) - 1:
                    ax.set_xlabel("epoch")
        key = [(matplotlib.lines.Line2D([], [], color="0.3", ls=STYLE["mean"][0], lw=STYLE["mean"][1]),
                f"mean of {most} seeds")]
        if most > 1:
            key += [(matplotlib.lines.Line2D([], [], color="0.3", ls=STYLE["best"][0], lw=1.3),
                     f"best run (lowest {rank_label} at the phase's last epoch)"),
                    (matplotlib.lines.Line2D([], [], color="0.3", ls=STYLE["worst"][0], lw=1.3),
                     f"worst run (highest {rank_label} there)")]
        if envelope:
            key.append((matplotlib.patches.Patch(color="0.3", alpha=0.2, lw=0), "min–max over seeds per epoch"))
        row = 0.25 / height
        legend = fig.legend([h for h, _ in key], [t for _, t in key], loc="lower center", ncol=len(key),
                            bbox_to_anchor=(0.5, 0.02 / height + row * (legend_rows - 1)), frameon=False)
        fig.add_artist(legend)
        handles = [matplotlib.lines.Line2D([], [], color=palette[s], lw=2.5) for s in spec.schemes]
        fig.legend(handles, texts, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height), ncol=ncol, frameon=False)
        what = (f"mean of {most} seeds, best and worst run by {rank_label} at each phase's last epoch (seeds in "
                "the legend, by phase)") if most > 1 else "one seed per scheme"
        fig.suptitle(f"{spec.title}\n{what}; dotted: learning-rate steps (rate on top)", fontsize="medium",
                     y=1 - 0.05 / height, va="top")
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
