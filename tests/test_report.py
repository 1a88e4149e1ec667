"""Results store and report stage: rows merged by run id, the paper's conventions, figures, no lost rows."""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fake_runs import commit_fake_evaluation
from itdiffusion.artifacts import PerImage, write_loss_curve
from itdiffusion.information import Curves, LogSNRProposal
from itdiffusion.results import ResultsStoreError, load_runs, record_run, record_runs
from itdiffusion.results.tables import CONTINUOUS_COLUMNS, DISCRETE_COLUMNS, cell_value
from itdiffusion.stages import report


def metrics(run_id: str, **values) -> dict:
    base = {
        "run_id": run_id,
        "label": run_id,
        "group": "g",
        "experiment": "smoke",
        "created": run_id,
        "num_images": 4,
        "npoints": 8,
        "network_evals": 32,
        "training_objective": "L_vlb",
        "config": {"big": "dropped from results.json"},
    }
    return {**base, **values}


def test_rows_merge_by_run_id(tmp_path):
    record_run(tmp_path, metrics("a", it_continuous_bpd=-4.0, it_continuous_bpd_stderr=0.1))
    record_run(tmp_path, metrics("b", it_continuous_bpd=-3.0, it_continuous_bpd_stderr=0.1))
    record_run(tmp_path, metrics("a", it_continuous_bpd=-4.5, it_continuous_bpd_stderr=0.1))  # a rerun of a
    runs = load_runs(tmp_path)
    assert set(runs) == {"a", "b"}
    assert runs["a"]["it_continuous_bpd"] == -4.5 and runs["b"]["it_continuous_bpd"] == -3.0
    assert "config" not in runs["a"]
    with pytest.raises(ValueError, match="run_id"):
        record_run(tmp_path, {"label": "no id"})


def _write_rows(results_dir: str, prefix: str, n: int) -> None:
    for i in range(n):
        record_run(results_dir, metrics(f"{prefix}{i}", vlb_bpd=3.0, vlb_bpd_stderr=0.01))


def test_concurrent_writers_keep_every_row(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_rows, args=(str(tmp_path), p, 8)) for p in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert set(load_runs(tmp_path)) == {f"{p}{i}" for p in "xy" for i in range(8)}
    csv_lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 16


def test_paper_conventions_and_columns(tmp_path):
    run = metrics(
        "base",
        paper_row="IDDPM",
        vlb_bpd=2.95,
        vlb_bpd_stderr=0.02,
        vlb_continuous_bpd=-4.1,
        vlb_continuous_bpd_stderr=0.02,
        it_continuous_bpd=-4.1,
        it_continuous_bpd_stderr=0.01,
        it_discrete_notails_bpd=3.1,
        it_discrete_notails_bpd_stderr=0.01,
        it_dequantized_bpd=3.2,
        it_dequantized_bpd_stderr=0.01,
    )
    by_name = {c.name: c for c in CONTINUOUS_COLUMNS + DISCRETE_COLUMNS}
    # Table 1's variational column: the discrete VLB minus log2(127.5) = 6.9944 bits/dim
    mean, stderr = cell_value(run, by_name["variational_paper_cont"])
    assert mean == pytest.approx(2.95 - math.log2(127.5)) and stderr == 0.02
    assert cell_value(run, by_name["vlb"]) == (2.95, 0.02)
    assert cell_value(metrics("empty"), by_name["vlb"]) is None
    record_run(tmp_path, run)
    md = (tmp_path / "results.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| base [IDDPM] | L_vlb"))
    assert f"{2.95 - math.log2(127.5):.3f} ± 0.020" in line and "-4.05" in line and "-4.09" in line
    assert "| Paper (CIFAR-10): variational | Paper (CIFAR-10): IT |" in md
    discrete = [x for x in md.splitlines() if x.startswith("| base [IDDPM] |")][1]
    assert "2.950 ± 0.020" in discrete and "3.16" in discrete and "3.17" in discrete
    assert "I-MDCE" not in md  # the masked-diffusion table only appears once such runs exist


def test_each_section_says_what_was_evaluated_and_whose_the_paper_numbers_are(tmp_path):
    record_run(tmp_path, metrics("crops", group="smoke", data="patches", model="iddpm_tiny",
                                 checkpoint="/ckpt/run/model.pt", checkpoint_sha256="abcdef0123456789"))
    record_run(tmp_path, metrics("full", group="repro", data="cifar10", num_images=10_000,
                                 model="iddpm_cifar10_vlb", checkpoint="/x/cifar10_uncond_vlb_50M_500K.pt"))
    md = (tmp_path / "results.md").read_text()
    sections = {part.split(" ", 1)[0]: part for part in md.split("\n## ")[1:]}
    assert "Evaluated: patches, 4 test images." in sections["smoke"]
    assert "crops: iddpm_tiny (checkpoint model.pt, sha256 abcdef01)" in sections["smoke"]
    assert "not for these rows" in sections["smoke"]  # a tiny model on photo crops: not the paper's peers
    assert "Evaluated: cifar10, 10000 test images." in sections["repro"]
    assert "not for these rows" not in sections["repro"]
    assert "Kong et al.,\nICLR 2023, for their models on the 10,000 CIFAR-10 test images" in md


def test_masked_diffusion_rows_get_their_own_table(tmp_path):
    record_run(
        tmp_path,
        metrics(
            "mdm", mdce_bpd=3.5, mdce_bpd_stderr=0.05, mdce_timefree_bpd=3.4, mdce_timefree_bpd_stderr=0.04
        ),
    )
    md = (tmp_path / "results.md").read_text()
    assert "Masked diffusion (I-MDCE)" in md
    assert "| mdm | 3.500 ± 0.050 | 3.400 ± 0.040 |" in md
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert "mdce_bpd" in header and "mdce_timefree_stderr" in header


def test_loss_series_prefers_bits_per_dim():
    points = [
        {"step": 1, "train_loss_nats": 10.0, "train_loss_bpd": 1.0, "heldout_loss_iddpm": None},
        {"step": 2, "train_loss_nats": 9.0, "train_loss_bpd": 0.9, "heldout_loss_iddpm": 0.5},
    ]
    assert report.loss_series(points, "train") == ("bpd", [(1, 1.0), (2, 0.9)])
    assert report.loss_series(points, "heldout") == ("iddpm", [(2, 0.5)])
    assert report.loss_series([{"step": 1}], "train") is None


def curves_per_image(logsnr: np.ndarray, reference_mmse: np.ndarray, *mmse: np.ndarray) -> PerImage:
    """A PerImage with the given curves (the other fields of the curves are placeholders)."""
    t = torch.from_numpy
    b, k = logsnr.shape
    curves = Curves(
        logsnr=t(logsnr),
        mmse=torch.stack([t(m) for m in mmse]),
        gaussian_mmse=t(reference_mmse),
        continuous_tail=torch.zeros(b, dtype=torch.float64),
        proposal=LogSNRProposal(0.0, 2.0),
        sampling="stratified",
        network_evals=k,
    )
    return PerImage(index=torch.arange(b), curves=curves, reference_mmse=t(reference_mmse))


def test_gap_data_integrates_a_known_gap():
    """A model whose error is a known amount below the Gaussian decoder's (used everywhere, as the estimate
    would): the binned gap follows it, and the area is the nats it saves."""
    from itdiffusion import figure_gap

    rng = np.random.default_rng(0)
    proposal = LogSNRProposal(0.0, 2.0)
    b, k = 200, 64
    logsnr = proposal.points(b * k, "random", torch.Generator().manual_seed(0)).reshape(b, k).numpy()
    mmse_g = 100 / (1 + np.exp(-logsnr))
    gap = 10 * np.exp(-(logsnr**2) / 4)
    per_image = curves_per_image(logsnr, mmse_g, mmse_g - gap + rng.normal(0, 0.1, logsnr.shape))
    per_image.curves.proposal = proposal
    curves = per_image.curves
    integrand = (curves.mmse[0] - per_image.reference_mmse) * torch.exp(-curves.log_q)  # the model everywhere
    per_image.continuous_integrand = integrand[None]
    per_image.estimates = {"it_continuous_nats": 0.5 * integrand.mean(1)[None]}  # h_G = 0, no tails
    curves.gaussian_nll = torch.zeros(b, dtype=torch.float64)
    data = figure_gap.gap_data(per_image, entropy_nats=0.0, dim=1)
    np.testing.assert_allclose(data.gap[0], 10 * np.exp(-(data.centres**2) / 4), atol=1.0)
    np.testing.assert_allclose(data.used, data.gap[0], atol=2.0)  # shares: the points per bin vary
    lo, hi = proposal.bounds
    grid = np.linspace(lo, hi, 20001)
    exact = 0.5 * np.trapezoid(10 * np.exp(-(grid**2) / 4), grid)  # nats the model saves
    assert data.sampled_gaussian_bpd == pytest.approx(0.0, abs=1e-9)  # the decoder at the images is mmse_G
    assert data.area_bpd * math.log(2) == pytest.approx(exact, rel=0.03)
    assert data.estimate_bpd == pytest.approx(-data.area_bpd, abs=1e-9)


def fake_evaluation(outputs: Path, run_id: str, group: str, **values) -> None:
    """A run dir as the evaluate stage leaves it: metrics.json and per_image.npz."""
    run_dir = outputs / "evaluate" / run_id
    rng = np.random.default_rng(len(run_id))
    logsnr = rng.uniform(-5, 5, (6, 16))
    mmse_g = 3072 / (1 + np.exp(-logsnr))
    commit_fake_evaluation(
        run_dir, metrics(run_id, group=group, dim=3072, gaussian_entropy_bpd=1.0, **values),
        curves_per_image(logsnr, mmse_g, mmse_g * 0.9),
    )


def test_report_stage_writes_tables_figures_and_keeps_old_rows(tmp_path, make_cfg):
    outputs = tmp_path / "outputs"
    fake_evaluation(
        outputs,
        "r-base",
        "repro1",
        paper_row="IDDPM",
        vlb_bpd=3.0,
        vlb_bpd_stderr=0.1,
        it_continuous_bpd=-4.0,
        it_continuous_bpd_stderr=0.1,
    )
    fake_evaluation(
        outputs,
        "r-tuned",
        "repro1",
        paper_row="IDDPM(tune)",
        it_continuous_bpd=-4.2,
        it_continuous_bpd_stderr=0.1,
    )
    curve_dir = tmp_path / "checkpoints" / "finetune" / "repro1-tune"  # where the finetune stage writes it
    curve_dir.mkdir(parents=True)
    write_loss_curve(
        curve_dir / "loss_curve.json",
        [
            {
                "step": s,
                "epoch": s / 2,
                "train_loss_nats": None if s == 0 else 9000.0 - s,
                "train_loss_bpd": None if s == 0 else 4.2 - 0.1 * s,
                "heldout_loss_nats": 9000.0 - s,
                "heldout_loss_bpd": 4.3 - 0.1 * s,
            }
            for s in range(6)
        ],
    )
    fake_evaluation(tmp_path / "elsewhere", "older", "repro0", vlb_bpd=3.3, vlb_bpd_stderr=0.1)  # not below
    older = tmp_path / "elsewhere" / "evaluate" / "older" / "metrics.json"  # outputs/, but in the store
    record_run(outputs / "results", {**json.loads(older.read_text()), "metrics_path": str(older)})
    (outputs / "evaluate" / "broken").mkdir(parents=True)
    (outputs / "evaluate" / "broken" / "metrics.json").write_text("{ truncated")

    out = report.run(make_cfg("run_id=rep"), tmp_path / "rundir")
    runs = load_runs(outputs / "results")
    assert set(runs) == {"older", "r-base", "r-tuned"}
    md = (outputs / "results" / "results.md").read_text()
    assert md.index("## repro1") < md.index("## repro0")  # newest group first
    assert md.index("r-base [IDDPM]") < md.index("r-tuned [IDDPM(tune)]")
    figures = out["figures"]["repro1"]
    made = {Path(f).stem.removeprefix("repro1_") for f in figures}
    # (no gap figure: these fake runs' per-image estimates are not the estimate of their curves)
    assert made == {"mmse", "per_image", "loss"}
    for fig in figures:
        assert f"]({fig})" in md
        with Image.open(outputs / "results" / fig) as im:
            assert im.format == "PNG" and im.size[0] > 100
    # a later evaluation re-renders results.md from the store: the figure links stay
    record_run(outputs / "results", metrics("late", group="repro1", vlb_bpd=3.1, vlb_bpd_stderr=0.1))
    md = (outputs / "results" / "results.md").read_text()
    assert all(f"]({fig})" in md for fig in figures)


def test_report_without_any_metrics_says_what_to_run(make_cfg, tmp_path):
    from itdiffusion.errors import UserError

    with pytest.raises(UserError, match="run the evaluate stage first"):
        report.run(make_cfg(), tmp_path / "rundir")


def test_record_runs_refuses_to_overwrite_an_unreadable_store(tmp_path):
    (tmp_path / "results.json").write_text("{ not json")
    with pytest.raises(ResultsStoreError, match="move it aside"):
        record_runs(tmp_path, [metrics("a")])
    assert (tmp_path / "results.json").read_text() == "{ not json"


def test_report_has_the_ddpm_rows_and_the_published_weights_rows(tmp_path, make_cfg):
    """DDPM, DDPM(tune) and ITD's published tuned weights beside the paper's Table 2 numbers."""
    outputs = tmp_path / "outputs"
    discrete = {"vlb_bpd": 3.4, "vlb_bpd_stderr": 0.01, "it_discrete_notails_bpd": 3.6,
                "it_discrete_notails_bpd_stderr": 0.01, "it_dequantized_bpd": 3.5,
                "it_dequantized_bpd_stderr": 0.01, "it_continuous_bpd": -3.7,
                "it_continuous_bpd_stderr": 0.01}
    runs = {  # run id: (label, paper row, training objective)
        "d-base": ("DDPM", "DDPM", "L_simple"),
        "d-tuned": ("DDPM(tune)", "DDPM(tune)", "L_simple + IT"),
        "d-pub": ("DDPM(tune), ITD's published weights", "DDPM(tune)", "L_simple + IT fine-tuning (ITD)"),
        "i-base": ("IDDPM", "IDDPM", "L_vlb"),
        "i-pub": ("IDDPM(tune), ITD's published weights", "IDDPM(tune)", "L_vlb + IT fine-tuning (ITD)"),
    }
    for run_id, (label, row, objective) in runs.items():
        fake_evaluation(outputs, run_id, "both", label=label, paper_row=row, training_objective=objective,
                        **discrete)
    report.run(make_cfg("run_id=rep"), tmp_path / "rundir")
    md = (outputs / "results" / "results.md").read_text()
    table2 = md[md.index("### Table 2"):md.index("### Runs")]
    lines = {x.split(" | ")[0].removeprefix("| "): x for x in table2.splitlines() if x.startswith("| ")}
    # ours (VLB, IT discrete no tails, with tails, dequantized), then the paper's three numbers
    assert lines["DDPM"].endswith("| 3.37 | 3.68 | 3.51 |")
    assert lines["DDPM(tune)"].endswith("| 3.45 | 3.48 | 3.41 |")
    assert lines["DDPM(tune), ITD's published weights [DDPM(tune)]"].endswith("| 3.45 | 3.48 | 3.41 |")
    assert lines["IDDPM(tune), ITD's published weights [IDDPM(tune)]"].endswith("| 3.14 | 3.15 | 3.18 |")
    assert lines["IDDPM"].endswith("| 2.94 | 3.16 | 3.17 |")
    assert "3.400 ± 0.010 | 3.600 ± 0.010 | — | 3.500 ± 0.010" in lines["DDPM"]
    # the paper's order: DDPM, IDDPM, DDPM(tune), IDDPM(tune)
    order = [table2.index(f"| {name}") for name in ("DDPM |", "IDDPM |", "DDPM(tune) |", "IDDPM(tune), ITD")]
    assert order == sorted(order)
    # Table 1: the DDPM rows have no published continuous numbers here; the IDDPM rows have theirs
    table1 = md[md.index("### Table 1"):md.index("### Table 2")]
    ddpm_line = next(x for x in table1.splitlines() if x.startswith("| DDPM | L_simple |"))
    assert ddpm_line.endswith("| — | — |") and "-3.700 ± 0.010" in ddpm_line
    assert next(x for x in table1.splitlines() if x.startswith("| IDDPM |")).endswith("| -4.05 | -4.09 |")
    csv_rows = {r.split(",")[0]: r for r in (outputs / "results" / "results.csv").read_text().splitlines()}
    assert "3.37" in csv_rows["d-base"] and "3.41" in csv_rows["d-pub"]


# --- runs that no longer verify ------------------------------------------------------------------------
def _edit_number(run_dir: Path) -> None:
    data = json.loads((run_dir / "metrics.json").read_text())
    data["it_continuous_bpd"] = -5.760
    (run_dir / "metrics.json").write_text(json.dumps(data))


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


TAMPERS = {  # name: what is done to run "a" (run "b" stays as it was)
    "edited number": _edit_number,
    "added number": lambda d: (d / "metrics.json").write_text(json.dumps(
        {**json.loads((d / "metrics.json").read_text()), "it_discrete_bpd": 1.0})),
    "truncated per_image": lambda d: (d / "per_image.npz").write_bytes(
        (d / "per_image.npz").read_bytes()[:100]),
    "flipped per_image byte": lambda d: _flip_byte(d / "per_image.npz"),
    "truncated metrics": lambda d: (d / "metrics.json").write_text((d / "metrics.json").read_text()[:50]),
    "swapped per_image": lambda d: (d / "per_image.npz").write_bytes(
        (d.parent / "b" / "per_image.npz").read_bytes()),
    "deleted per_image": lambda d: (d / "per_image.npz").unlink(),
    "deleted run dir": lambda d: shutil.rmtree(d),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_run_that_no_longer_verifies_leaves_the_tables_and_fails_the_report(tmp_path, make_cfg, tamper):
    from itdiffusion.errors import UserError

    outputs = tmp_path / "outputs"
    for run_id, value in (("a", 2.464), ("b", 2.5)):
        fake_evaluation(outputs, run_id, "g", it_continuous_bpd=value, it_continuous_bpd_stderr=0.01)
    report.run(make_cfg("run_id=rep1"), tmp_path / "rep1")  # both rows verify
    md = (outputs / "results" / "results.md").read_text()
    assert "| a | L_vlb | — | — | — | 2.464 ± 0.010 |" in md and "Left out" not in md
    TAMPERS[tamper](outputs / "evaluate" / "a")
    with pytest.raises(UserError, match=r"1 run\(s\) no longer verify .*\(a; .*report.allow_invalid=true"):
        report.run(make_cfg("run_id=rep2"), tmp_path / "rep2")
    md = (outputs / "results" / "results.md").read_text()
    tables, left_out = md.split("## Left out")
    assert "| a |" not in tables and "| b | L_vlb | — | — | — | 2.500 ± 0.010 |" in tables
    assert "-5.760" not in md and "| a | a |" in left_out
    csv_ids = [line.split(",")[0] for line in (outputs / "results" / "results.csv").read_text().splitlines()]
    assert csv_ids == ["run_id", "b"]
    stored = load_runs(outputs / "results")
    assert stored["a"]["invalid"] and "invalid" not in stored["b"]
    with pytest.raises(UserError):  # the row stays marked: every report says so until the run is redone
        report.run(make_cfg("run_id=rep3"), tmp_path / "rep3")
    # told to skip: the row is dropped from the store and the report succeeds
    report.run(make_cfg("run_id=rep4", "report.allow_invalid=true"), tmp_path / "rep4")
    assert set(load_runs(outputs / "results")) == {"b"}
    assert "Left out" not in (outputs / "results" / "results.md").read_text()


def test_a_rerun_run_comes_back_and_an_edited_store_heals(tmp_path, make_cfg):
    outputs = tmp_path / "outputs"
    fake_evaluation(outputs, "a", "g", it_continuous_bpd=2.464, it_continuous_bpd_stderr=0.01)
    report.run(make_cfg("run_id=rep1"), tmp_path / "rep1")
    store = outputs / "results" / "results.json"
    data = json.loads(store.read_text())
    data["runs"]["a"]["it_continuous_bpd"] = -5.76  # an edited store: the report rewrites rows from run dirs
    store.write_text(json.dumps(data))
    _edit_number(outputs / "evaluate" / "a")
    from itdiffusion.errors import UserError

    with pytest.raises(UserError):
        report.run(make_cfg("run_id=rep2"), tmp_path / "rep2")
    shutil.rmtree(outputs / "evaluate" / "a")  # the run redone
    fake_evaluation(outputs, "a", "g", it_continuous_bpd=2.47, it_continuous_bpd_stderr=0.01)
    report.run(make_cfg("run_id=rep3"), tmp_path / "rep3")
    runs = load_runs(outputs / "results")
    assert runs["a"]["it_continuous_bpd"] == pytest.approx(2.47) and "invalid" not in runs["a"]


def test_an_edited_number_fails_the_report_on_the_command_line(tmp_path):
    from conftest import run_cli

    outputs = tmp_path / "outputs"
    fake_evaluation(outputs, "a", "g", it_continuous_bpd=2.464, it_continuous_bpd_stderr=0.01)
    _edit_number(outputs / "evaluate" / "a")
    proc = run_cli("report", "logger=none", "run_id=rep", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("error: 1 run(s) no longer verify and are left out of the tables (a;")
    assert "it_continuous_bpd: -5.76 stored" in (outputs / "results" / "results.md").read_text()
    assert "-5.760" not in (outputs / "results" / "results.csv").read_text()


def test_a_label_with_a_pipe_keeps_the_markdown_table(tmp_path):
    record_run(tmp_path, metrics("p", label="a|b", vlb_bpd=3.0, vlb_bpd_stderr=0.1))
    md = (tmp_path / "results.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| a"))
    assert line.startswith("| a\\|b | ") and line.count(" | ") == md.splitlines()[
        md.splitlines().index(line) - 2].count(" | ")
