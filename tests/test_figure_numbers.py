"""Every number a figure draws is the table's: the report's figures of a small run, read back from what was
drawn (the sidecar each figure writes from its matplotlib objects), against metrics.json and results.md."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from itdiffusion.artifacts import read_per_image, write_loss_curve
from itdiffusion.figure_files import sidecar_path
from itdiffusion.stages import evaluate, report

NUMBER = re.compile(r"[−-]?\d+\.\d+")


@pytest.fixture(scope="module")
def small_run(tiny_checkpoints, shared_cache, tmp_path_factory):
    """Two evaluations of one group (base and tuned rows, pixel maps on) with a fine-tuning loss curve each
    for a base and a tuned run, then the report stage."""
    from hydra import compose, initialize_config_dir

    from conftest import path_overrides
    from itdiffusion.stages import CONFIG_DIR

    root = tmp_path_factory.mktemp("figure_numbers")

    def cfg(*overrides):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("config", overrides=[*path_overrides(root), *TINY, "logger.group=figs",
                                                f"paths.cache_dir={shared_cache}", "estimator.pixel_maps=2",
                                                *overrides])

    found = {}
    for k, (row, run_id) in enumerate((("IDDPM", "figs-base"), ("'IDDPM(tune)'", "figs-tuned"))):
        c = cfg(f"model.checkpoint={tiny_checkpoints[k]}", f"run_id={run_id}", f"paper_row={row}",
                f"label={run_id.removeprefix('figs-')}")
        found[run_id] = evaluate.run(c, root / "outputs" / "evaluate" / run_id)
    for name, steps in (("figs-base-train", 60), ("figs-tune", 20)):
        folder = root / "checkpoints" / "finetune" / name
        folder.mkdir(parents=True)
        write_loss_curve(folder / "loss_curve.json",
                         [{"step": s, "train_loss_bpd": 4.0 - s / 100, "heldout_loss_bpd": 4.1 - s / 100}
                          for s in range(0, steps + 1, 5)], objective="it")
    out = report.run(cfg("run_id=figs-report"), root / "report")
    results = root / "outputs" / "results"
    return found, out, results


def drawn(results: Path, name: str) -> dict:
    return json.loads(sidecar_path(results / f"figures/figs_{name}.png").read_text())


def test_every_figure_of_the_run_is_drawn(small_run):
    _, out, results = small_run
    assert {Path(f).stem for f in out["figures"]["figs"]} == {
        "figs_mmse", "figs_mmse_gap", "figs_per_image", "figs_pixel_maps", "figs_loss"}
    for f in out["figures"]["figs"]:
        assert (results / f).is_file() and sidecar_path(results / f).is_file()


def test_the_gap_figure_draws_the_table(small_run):
    found, out, results = small_run
    fig = drawn(results, "mmse_gap")
    md = (results / "results.md").read_text()
    legend = [t for t in fig["texts"] if "bits/dim" in t]
    assert len(legend) == 4  # two lines per run
    drawn_numbers = set()
    for run_id, label in (("figs-base", "base [IDDPM]"), ("figs-tuned", "tuned [IDDPM(tune)]")):
        metrics = found[run_id]
        table = f"{metrics['it_continuous_bpd']:.3f} ± {metrics['it_continuous_bpd_stderr']:.3f}"
        assert table in md  # Table 1's full-range IT cell
        estimate_line = next(t for t in legend if t.startswith(label) and "Ĝ" in t)
        estimate, sampled, area = (float(x.replace("−", "-")) for x in NUMBER.findall(estimate_line))
        assert f"{estimate:.3f}" == f"{metrics['it_continuous_bpd']:.3f}"  # the legend is the table's cell
        assert abs(sampled - area - estimate) <= 1.5e-3  # the three printed numbers add up (rounding)
        gaussian_line = next(t for t in legend if t.startswith(label) and "closed form" in t)
        (gaussian,) = (float(x.replace("−", "-")) for x in NUMBER.findall(gaussian_line))
        assert f"{gaussian:.3f}" == f"{metrics['gaussian_nll_bpd']:.3f}"
        check = out["figure_checks"][run_id]
        assert abs(check["sampled_gaussian_bpd"] - check["area_bpd"] - metrics["it_continuous_bpd"]) < 1e-5
        drawn_numbers |= {f"{estimate:.3f}", f"{sampled:.3f}", f"{area:.3f}", f"{gaussian:.3f}"}
    # no other number anywhere in the figure's text
    others = {x.replace("−", "-") for t in fig["texts"] for x in NUMBER.findall(t)}
    assert others <= {n.replace("−", "-") for n in drawn_numbers}


def test_the_gap_figures_area_is_the_table_estimate(small_run):
    """The shaded stairs' area, integrated from the drawn data, is 2 (Ĝ − estimate) in nats per image."""
    import matplotlib

    matplotlib.use("Agg")
    from itdiffusion import figure_gap

    found, _, results = small_run
    for run_id in ("figs-base", "figs-tuned"):
        metrics = found[run_id]
        per_image = read_per_image(results.parent / "evaluate" / run_id / "per_image.npz")
        dim = metrics["dim"]
        data = figure_gap.gap_data(per_image, metrics["gaussian_entropy_bpd"] * dim * math.log(2), dim)
        area_nats = 0.5 * float(np.sum(np.diff(data.edges) * data.used))
        implied = data.sampled_gaussian_bpd - area_nats / (dim * math.log(2))
        assert implied == pytest.approx(metrics["it_continuous_bpd"], abs=1e-5)


def test_no_mmse_curve_leaves_its_axes(small_run):
    _, _, results = small_run
    fig = drawn(results, "mmse")
    for ax in fig["axes"]:
        lo, hi = ax["ylim"]
        assert ax["lines"]
        for line in ax["lines"]:
            assert lo <= line["min"] and line["max"] <= hi, (ax["title"], line)
    styles = [t for t in fig["texts"] if t.startswith(("N(", "Gaussian decoder"))]
    assert len(set(styles)) == 3  # the three references, each with its own legend entry


def test_pixel_map_totals_are_the_stored_maps(small_run):
    _, _, results = small_run
    fig = drawn(results, "pixel_maps")
    maps = {run_id: read_per_image(results.parent / "evaluate" / run_id / "per_image.npz").pixel_maps
            for run_id in ("figs-base", "figs-tuned")}
    totals = [t for t in fig["texts"] if "image total" in t]
    expected = [f"{label}: bits/pixel\nimage total {float(m['total_nats'][0, i]) / math.log(2):.0f} bits"
                for i in range(2) for label, m in (("base [IDDPM]", maps["figs-base"]),
                                                   ("tuned [IDDPM(tune)]", maps["figs-tuned"]))]
    assert sorted(totals) == sorted(expected)  # column titles on every row, totals as stored
    bits = {k: (m["nats"][0] / math.log(2)).reshape(2, 3, 32, 32).sum(1).numpy() for k, m in maps.items()}
    delta = [f"second − first\n{(bits['figs-tuned'][i] - bits['figs-base'][i]).sum():+.0f} bits"
             for i in range(2)]
    assert sorted(t for t in fig["texts"] if t.startswith("second")) == sorted(delta)
    lim = float(np.percentile(np.abs(np.concatenate([b.ravel() for b in bits.values()])), 99))
    title = fig["texts"][0]
    assert f"±{lim:.3g} bits" in title and "99th percentile" in title


def test_per_image_and_loss_figures(small_run):
    _, _, results = small_run
    loss = drawn(results, "loss")
    assert len(loss["axes"]) == 2  # base and tuned on their own axes
    assert {ax["title"].split(":")[0] for ax in loss["axes"]} == {"figs-base-train", "figs-tune"}
    for ax in loss["axes"]:
        assert {line["label"] for line in ax["lines"]} == {"train", "heldout"}
    per_image = drawn(results, "per_image")
    assert "base [IDDPM]" in per_image["texts"] and "tuned [IDDPM(tune)]" in per_image["texts"]


def test_a_figure_that_disagrees_with_its_table_stops_the_report(small_run, tmp_path):
    """metrics.json edited after the evaluation (its per_image.npz unchanged): the gap figure would show
    another number than the table; the report's check of every number against per_image.npz leaves the row
    out of the tables before any figure is drawn, and the report fails naming the run."""
    import shutil

    from hydra import compose, initialize_config_dir

    from conftest import path_overrides
    from itdiffusion.errors import UserError
    from itdiffusion.stages import CONFIG_DIR

    _, _, results = small_run
    run_dir = tmp_path / "outputs" / "evaluate" / "figs-base"
    shutil.copytree(results.parent / "evaluate" / "figs-base", run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["it_continuous_bpd"] += 0.01
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*path_overrides(tmp_path), "logger=none", "run_id=bad-report"])
    with pytest.raises(UserError, match=r"1 run\(s\) no longer verify .*\(figs-base;"):
        report.run(cfg, tmp_path / "report")
    assert "| figs-base |" not in (tmp_path / "outputs" / "results" / "results.md").read_text().split(
        "## Left out")[0]
