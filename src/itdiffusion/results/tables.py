"""The columns of the results tables, the published numbers beside them, and their rows.

Tables follow Kong et al. (ICLR 2023) with their published numbers beside ours, and label their
conventions (docs/estimators.md):

- Table 1, continuous density (bits/dim, negative): the paper's "variational bound" is the
  discrete VLB minus log2(127.5) (a uniform density inside each pixel bin); the better-founded
  continuous-density VLB (IDDPM's decoder replaced by the Gaussian density of x_0) sits beside it.
  "IT bound" is the continuous IT estimate: on ITD's log-SNR range (the paper's convention, compared with
  its numbers) and on the full range the pilot chose (a valid bound, exact for an exact denoiser).
- Table 2, discrete (bits/dim): the discrete VLB; the IT discrete estimate without the tails
  outside the sampled log-SNR range (the paper's column) and with them (a bound); the dequantized
  IT estimate (which already includes d log2(1/delta) = + log2(127.5) per dimension).
- Masked diffusion (I-MDCE): rows of runs whose metrics carry ``mdce_bpd`` / ``mdce_timefree_bpd``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from itdiffusion.units import DEQUANT_OFFSET_BPD

log = logging.getLogger(__name__)


# Kong, Brekelmans & Ver Steeg, "Information-Theoretic Diffusion", ICLR 2023: Tables 1 and 2 (bits/dim),
# rows in the paper's order. Keys are the column names below. The ensemble's 2.90 is its discrete IT estimate
# (ITD's scripts/plot_results.py forms it from the pointwise minimum of the rounded MMSE curves of all four
# models, DDPM, IDDPM and both tuned, and the Gaussian's). DDPM rows: Table 2 only (google/ddpm-cifar10-32
# through diffusers); their Table 1 (continuous) numbers are not given here (not verified from the paper).
# A run of ITD's published fine-tuned weights names the tuned row (paper_row=IDDPM(tune) / DDPM(tune)).
PAPER = {
    "DDPM": {"vlb": 3.37, "it_discrete_notails": 3.68, "it_dequantized": 3.51},
    "IDDPM": {
        "variational_paper_cont": -4.05,
        "it_continuous_itd_range": -4.09,
        "vlb": 2.94,
        "it_discrete_notails": 3.16,
        "it_dequantized": 3.17,
    },
    "DDPM(tune)": {"vlb": 3.45, "it_discrete_notails": 3.48, "it_dequantized": 3.41},
    "IDDPM(tune)": {
        "variational_paper_cont": -3.85,
        "it_continuous_itd_range": -4.28,
        "vlb": 3.14,
        "it_discrete_notails": 3.15,
        "it_dequantized": 3.18,
    },
    "Ensemble": {"it_discrete_notails": 2.90},
}
PAPER_ORDER = tuple(PAPER)

# The key of a stored row whose run dir no longer verifies (the reason): such rows are left out of the tables.
INVALID = "invalid"


@dataclass(frozen=True)
class Column:
    """A table column: a metrics key (bits/dim, with a ``_stderr`` twin) and an optional shift."""

    name: str  # key in PAPER and in the CSV
    header: str
    metric: str  # metrics.json key
    offset: float = 0.0  # added to the metric (the paper's conventions)
    short: str = ""  # header of the column of published numbers


CONTINUOUS_COLUMNS = (
    Column(
        "variational_paper_cont",
        "Variational bound (paper: VLB − log2 127.5)",
        "vlb_bpd",
        -DEQUANT_OFFSET_BPD,
        short="variational",
    ),
    Column("vlb_continuous", "Variational bound (continuous-density decoder)", "vlb_continuous_bpd"),
    Column("it_continuous_itd_range", "IT bound (paper: ITD's log-SNR range)", "it_continuous_itd_range_bpd",
           short="IT"),
    Column("it_continuous", "IT bound (full log-SNR range)", "it_continuous_bpd"),
)
DISCRETE_COLUMNS = (
    Column("vlb", "Variational bound", "vlb_bpd", short="variational"),
    Column(
        "it_discrete_notails", "IT discrete (paper: no tails)", "it_discrete_notails_bpd", short="IT discrete"
    ),
    Column("it_discrete", "IT discrete (with tails)", "it_discrete_bpd"),
    Column("it_dequantized", "IT dequantized", "it_dequantized_bpd", short="IT dequantized"),
)
# Hook for the discrete branch (masked diffusion, Jeon et al. 2025): its runs write these keys.
MDCE_COLUMNS = (
    Column("mdce", "I-MDCE", "mdce_bpd"),
    Column("mdce_timefree", "I-MDCE (time-free)", "mdce_timefree_bpd"),
)


def cell_value(run: Mapping, column: Column) -> tuple[float, float] | None:
    """(mean, stderr) of ``column`` for ``run`` in bits/dim, or None if the run has no such metric."""
    mean = run.get(column.metric)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return None
    stderr = run.get(f"{column.metric}_stderr")
    return mean + column.offset, (float("nan") if stderr is None else stderr)


def format_cell(value: tuple[float, float] | None) -> str:
    if value is None:
        return "—"
    mean, stderr = value
    return f"{mean:.3f} ± {stderr:.3f}" if math.isfinite(stderr) else f"{mean:.3f}"


REFERENCE_ONLY_MARK = " ᴳ"  # the Gaussian reference's decoder in every log-SNR bin: the reference's bound
MISSED_TARGET_MARK = " ‡"  # a dataset budget's stderr target not met
FAMILY_OF = {"it_continuous_itd_range": "it_continuous", "it_discrete_notails": "it_discrete"}


def cell_marks(run: Mapping, column: Column) -> str:
    """The marks after a cell: :data:`REFERENCE_ONLY_MARK` where metrics.json's ``it_reference_only`` says the
    estimate is the Gaussian reference's bound, :data:`MISSED_TARGET_MARK` where the dataset budget's
    ``stderr_check`` says its stderr target was missed."""
    name = column.metric.removesuffix("_bpd")
    marks = ""
    if (run.get("it_reference_only") or {}).get(name):
        marks += REFERENCE_ONLY_MARK
    check = ((run.get("budget") or {}).get("stderr_check") or {}).get(FAMILY_OF.get(name, name))
    if check is not None and not check.get("met", True):
        marks += MISSED_TARGET_MARK
    return marks


def decoder_choice_notes(rows: list[dict]) -> list[str]:
    """One line per run whose IT estimates used a decoder choice fitted on the pilot: in which of the
    equal-probability log-SNR bins of its proposal the Gaussian decoder stood in for the network."""
    labels = row_labels(rows)
    out = []
    for run in rows:
        found = run.get("decoder_choice") or {}
        groups_ = found.get("groups") or {}
        group = groups_.get("ensemble") or groups_.get("m0")
        if not group:
            continue
        parts = []
        for family, used in group.get("used", {}).items():
            bins = [j for j, name in enumerate(used) if name == "gaussian"]
            parts.append(f"{family} {_ranges(bins) or 'none'}")
        out.append(f"- {labels[run['run_id']]}: Gaussian decoder in log-SNR bins {'; '.join(parts)} "
                   f"(of {group['nbins']}; fitted on {found.get('pilot_images')} pilot images' own draws)")
    return out


def _ranges(bins: list[int]) -> str:
    spans: list[list[int]] = []
    for j in bins:
        if spans and spans[-1][1] == j - 1:
            spans[-1][1] = j
        else:
            spans.append([j, j])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def groups(runs: Mapping[str, Mapping]) -> list[tuple[str, list[dict]]]:
    """Runs by reproduction group, newest group first; in a group: paper rows in paper order, then by time.
    Rows marked :data:`INVALID` are left out."""
    by_group: dict[str, list[dict]] = {}
    for run_id, run in runs.items():
        if not run.get(INVALID):  # rows of runs that no longer verify are listed apart (render_markdown)
            by_group.setdefault(run.get("group") or "ungrouped", []).append({"run_id": run_id, **run})

    def row_key(run):
        paper = run.get("paper_row")
        return (PAPER_ORDER.index(paper) if paper in PAPER else len(PAPER_ORDER), run.get("created") or "")

    ordered = [(g, sorted(rs, key=row_key)) for g, rs in by_group.items()]
    return sorted(ordered, key=lambda item: max(r.get("created") or "" for r in item[1]), reverse=True)


def table_rows(rows: list[dict], columns: tuple[Column, ...], lead: tuple[str, ...] = ()) -> list[list[str]]:
    """One line per run: model label, the ``lead`` fields, our values, then the paper's values."""
    out = []
    labels = row_labels(rows)
    for run in rows:
        paper = PAPER.get(run.get("paper_row") or "", {})
        line = [labels[run["run_id"]], *[_lead(run, f) for f in lead]]
        line += [format_cell(cell_value(run, c)) + cell_marks(run, c) for c in columns]
        line += [f"{paper[c.name]:.2f}" if c.name in paper else "—" for c in columns if _paper_has(c)]
        out.append(line)
    return out


def numeric_table(rows: list[dict], columns: tuple[Column, ...], lead: tuple[str, ...] = ()
                  ) -> tuple[list[str], list[list]]:
    """(headers, rows) of a table of numbers (for wandb): ``model``, ``run_id``, the ``lead`` fields, then
    per column ``<name>``, ``<name>_stderr``, ``<name>_paper`` and ``<name>_diff`` (ours minus the paper's),
    bits/dim; None where there is no value."""
    headers = ["model", "run_id", *lead]
    for c in columns:
        headers += [c.name, f"{c.name}_stderr", f"{c.name}_paper", f"{c.name}_diff"]
    labels = row_labels(rows)
    out = []
    for run in rows:
        paper = PAPER.get(run.get("paper_row") or "", {})
        line: list = [labels[run["run_id"]], run["run_id"], *[_lead(run, f) for f in lead]]
        for c in columns:
            value, published = cell_value(run, c), paper.get(c.name)
            mean, stderr = value if value is not None else (None, None)
            stderr = stderr if stderr is not None and math.isfinite(stderr) else None
            diff = mean - published if mean is not None and published is not None else None
            line += [mean, stderr, published, diff]
        out.append(line)
    return headers, out


def row_labels(rows: list[dict]) -> dict[str, str]:
    """Each run's row name: its label (and paper row); where several rows of a table share a name, the run
    id and the settings that differ between them (log-SNR points, checkpoint sha256 prefix)."""
    base = {r["run_id"]: _label(r) for r in rows}
    out = {}
    for run in rows:
        twins = [r for r in rows if base[r["run_id"]] == base[run["run_id"]]]
        if len(twins) == 1:
            out[run["run_id"]] = base[run["run_id"]]
            continue
        extra = [f"run {run['run_id']}"]
        if len({str(r.get("npoints")) for r in twins}) > 1:
            extra.append(f"K={run.get('npoints') or '—'}")
        if len({shorten(r.get("checkpoint_sha256"), 8) for r in twins}) > 1:
            extra.append(f"ckpt {shorten(run.get('checkpoint_sha256'), 8)}")
        out[run["run_id"]] = f"{base[run['run_id']]} ({', '.join(extra)})"
    return out


def is_ensemble(run: Mapping) -> bool:
    return isinstance(run.get("checkpoint"), list) or bool(run.get("members"))


def _lead(run: Mapping, key: str):
    """A lead field's text; an ensemble has no single training objective."""
    if key == "training_objective" and is_ensemble(run):
        return "—"
    return str(run.get(key) or "—")


def table_headers(columns: tuple[Column, ...], lead: tuple[str, ...] = ()) -> list[str]:
    return [
        "Model",
        *lead,
        *[c.header for c in columns],
        *[f"Paper (CIFAR-10): {c.short}" for c in columns if _paper_has(c)],
    ]


PAPER_DATA, PAPER_IMAGES = "cifar10", 10_000  # what the paper's numbers were measured on: the test set


def evaluated(rows: list[dict]) -> list[str]:
    """What a group's rows evaluated (data set, test images, models and checkpoints), and, unless every row
    is a full CIFAR-10 test-set evaluation, that the paper's columns are not comparable with them."""
    data = sorted({f"{r.get('data') or 'data set not recorded'}, {r.get('num_images')} test images"
                   for r in rows})
    labels = row_labels(rows)
    models = [f"{labels[r['run_id']]}: {shorten(r.get('model'), 60)} (checkpoint "
              f"{_checkpoint_name(r.get('checkpoint'))}, sha256 {shorten(r.get('checkpoint_sha256'), 8)})"
              for r in rows]
    out = [f"Evaluated: {'; '.join(data)}.", "", "Models: " + "; ".join(models) + ".", ""]
    full = all(r.get("data") == PAPER_DATA and r.get("num_images") == PAPER_IMAGES for r in rows)
    if not full:
        out += ["**The Paper columns are Kong et al.'s numbers for their CIFAR-10 models on the "
                f"{PAPER_IMAGES:,} CIFAR-10 test images, not for these rows**: set beside them for reference "
                "only.", ""]
    return out


def _checkpoint_name(value) -> str:
    if not value:
        return "—"
    if isinstance(value, list):
        return ", ".join(_checkpoint_name(v) for v in value)
    return Path(str(value)).name


def _paper_has(column: Column) -> bool:
    return any(column.name in numbers for numbers in PAPER.values())


def _label(run: Mapping) -> str:
    label = str(run.get("label") or run.get("model") or run["run_id"])
    paper = run.get("paper_row")
    return label if not paper or paper == label else f"{label} [{paper}]"


def shorten(value, n: int = 12) -> str:
    if not value:
        return "—"
    if isinstance(value, list):
        return ", ".join(shorten(v, n) for v in value)
    return str(value)[:n]
