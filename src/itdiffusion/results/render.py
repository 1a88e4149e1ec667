"""The store rendered: ``results.md`` (the tables by reproduction group, with their figures) and
``results.csv`` (one line per run)."""
from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from pathlib import Path

from itdiffusion.results.tables import (
    CONTINUOUS_COLUMNS,
    DISCRETE_COLUMNS,
    INVALID,
    MDCE_COLUMNS,
    MISSED_TARGET_MARK,
    PAPER,
    REFERENCE_ONLY_MARK,
    cell_value,
    decoder_choice_notes,
    evaluated,
    groups,
    row_labels,
    shorten,
    table_headers,
    table_rows,
)

log = logging.getLogger(__name__)


CSV_FIELDS = (
    "run_id",
    "group",
    "experiment",
    "label",
    "paper_row",
    "model",
    "training_objective",
    "num_images",
    "npoints",
    "network_evals",
    "checkpoint_sha256",
    "git_commit",
    "created",
)


def render_markdown(runs: Mapping[str, Mapping], figures: Mapping[str, list[str]]) -> str:
    lines = [
        "# Results",
        "",
        "Bits per dimension on the test set, mean ± standard error over test images (the Monte Carlo",
        "noise of each image's estimate is included). Paper columns: the published numbers of Kong et al.,",
        "ICLR 2023, for their models on the 10,000 CIFAR-10 test images.",
        "",
    ]
    if not runs:
        lines.append("No evaluated runs yet.")
    for group, rows in groups(runs):
        experiments = sorted({str(r.get("experiment")) for r in rows})
        lines += [f"## {group} (experiment: {', '.join(experiments)})", ""]
        lines += evaluated(rows)
        mdce_rows = [r for r in rows if any(r.get(c.metric) is not None for c in MDCE_COLUMNS)]
        gaussian_rows = [r for r in rows if r not in mdce_rows]  # masked models have no Table 1/2 estimates
        lines += _md_table(
            "Table 1 (continuous density, bits/dim, lower is better)",
            table_headers(CONTINUOUS_COLUMNS, ("Training objective",)),
            table_rows(gaussian_rows, CONTINUOUS_COLUMNS, ("training_objective",)),
        )
        lines += [
            "The paper's variational column is the discrete VLB minus log2(127.5) (uniform density in each",
            "bin); the continuous-density column is the VLB with IDDPM's decoder replaced by the Gaussian",
            "density of x_0.",
            "",
        ]
        lines += _md_table(
            "Table 2 (discrete, bits/dim)",
            table_headers(DISCRETE_COLUMNS),
            table_rows(gaussian_rows, DISCRETE_COLUMNS),
        )
        lines += [
            "IT discrete: the paper leaves out the integral outside the sampled log-SNR range (the tails);",
            "the next column adds them (a bound). IT dequantized: the continuous IT estimate of uniformly",
            "dequantized images plus log2(127.5).",
            f"{REFERENCE_ONLY_MARK.strip()}: the Gaussian reference's decoder in every log-SNR bin, so the",
            "IT value is the reference's bound and says nothing about the network. "
            f"{MISSED_TARGET_MARK.strip()}: the",
            "dataset budget's stderr target was not met (metrics.json budget.stderr_check).",
            "",
        ]
        notes = decoder_choice_notes(gaussian_rows)
        if notes:
            lines += ["Decoder choice per equal-probability log-SNR bin of the proposal (both protocols):",
                      "", *notes, ""]
        if mdce_rows:
            lines += _md_table(
                "Masked diffusion (I-MDCE), bits/dim",
                table_headers(MDCE_COLUMNS),
                table_rows(mdce_rows, MDCE_COLUMNS),
            )
        lines += _md_table(
            "Runs",
            [
                "Model",
                "run id",
                "images",
                "log-SNR points",
                "network evals",
                "checkpoint sha256",
                "git commit",
            ],
            [
                [
                    row_labels(rows)[r["run_id"]],
                    r["run_id"],
                    str(r.get("num_images")),
                    str(r.get("npoints") or "—"),
                    str(r.get("network_evals")),
                    shorten(r.get("checkpoint_sha256")),
                    shorten(r.get("git_commit")),
                ]
                for r in rows
            ],
        )
        for fig in figures.get(group, []):
            lines += [f"![{Path(fig).stem}]({fig})", ""]
    invalid = {run_id: run for run_id, run in runs.items() if run.get(INVALID)}
    if invalid:
        lines += ["## Left out: runs that no longer verify", "",
                  "Their run dirs changed since they were evaluated (files edited, truncated, swapped or "
                  "deleted); rerun them, or run the report with report.allow_invalid=true to drop them.", ""]
        lines += _md_table("Runs left out", ["run id", "label", "why"],
                           [[run_id, str(run.get("label") or "—"), str(run[INVALID])]
                            for run_id, run in invalid.items()])
    return "\n".join(lines).rstrip() + "\n"


def render_csv(runs: Mapping[str, Mapping]) -> str:
    columns = CONTINUOUS_COLUMNS + DISCRETE_COLUMNS + MDCE_COLUMNS
    names = list(dict.fromkeys(c.name for c in columns))
    header = [*CSV_FIELDS, *[f"{n}{s}" for n in names for s in ("_bpd", "_stderr", "_paper")]]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for _, rows in groups(runs):
        for run in rows:
            by_name = {c.name: c for c in columns}
            paper = PAPER.get(run.get("paper_row") or "", {})
            line = [_csv_scalar(run.get(f)) for f in CSV_FIELDS]
            for n in names:
                value = cell_value(run, by_name[n])
                line += [
                    "" if value is None else repr(value[0]),
                    "" if value is None else repr(value[1]),
                    repr(paper[n]) if n in paper else "",
                ]
            writer.writerow(line)
    return buf.getvalue()


def _md_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def md_cell(text: str) -> str:
    """``text`` as one markdown table cell: ``|`` escaped, line breaks as spaces."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").splitlines())


def _csv_scalar(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(map(str, value))
    return str(value)
