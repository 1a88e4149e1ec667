"""What the wandb runs hold, read back from the offline ``.wandb`` files: numeric metrics once, settings as
config, MMSE curves, per-image values, artifacts and their lineage, a resumed fine-tune's run id; and
figures whose data agree with metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, path_overrides, run_cli
from itdiffusion import artifacts, figures, run_figures, tracking
from itdiffusion.stages import evaluate, finetune
from wandb_records import offline_runs


@pytest.fixture(autouse=True)
def _no_remembered_failure(monkeypatch):
    monkeypatch.setattr(tracking, "_online_failure", None)
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "WANDB_TAGS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def wb_cfg(make_cfg, shared_cache, tmp_path):
    def make(*overrides):
        return make_cfg(*TINY, f"paths.cache_dir={shared_cache}", "logger=wandb",
                        f"logger.dir={tmp_path / 'wb'}", "logger.group=g", *overrides)

    return make


def by_job(tmp_path, job):
    return [r for r in offline_runs(tmp_path / "wb") if r.job_type == job]


def test_evaluate_run_holds_numbers_config_curves_per_image_values_and_its_artifact(
        wb_cfg, tiny_checkpoints, tmp_path):
    cfg = wb_cfg(f"model.checkpoint={tiny_checkpoints[0]}", "run_id=ev1", "paper_row=IDDPM",
                 "estimator.pixel_maps=2")
    metrics = evaluate.run(cfg, tmp_path / "ev1")
    [run] = by_job(tmp_path, "evaluate")
    assert run.name == "evaluate-ev1" and run.group == "g"
    assert set(run.tags) >= {"smoke", "iddpm_tiny", "IDDPM", metrics["training_objective"][:64]}
    # metrics once, as numbers, with their errors as their own keys; settings in the config
    numbers = [row for row in run.history if "it_continuous_bpd" in row]
    assert len(numbers) == 1
    row = numbers[0]
    for key in ("it_continuous_bpd", "it_continuous_bpd_stderr", "it_continuous_bpd_mc_stderr", "vlb_bpd",
                "vlb_bpd_stderr", "it_discrete_bpd", "it_dequantized_bpd"):
        assert row[key] == pytest.approx(metrics[key])
    assert not any(k.startswith("eval/") for k in run.logged_keys())
    for setting in ("dim", "world_size", "elapsed_s", "num_images", "npoints"):
        assert setting not in run.logged_keys() and setting in run.config["run"]
    assert run.config["estimator"]["npoints"] == 4
    # the groups evaluate reads, not finetune's
    assert {"paths", "data", "model", "estimator", "logger"} <= set(run.config)
    assert "finetune" not in run.config
    # the binned MMSE curves: every model and the references, as a table with a line plot
    curve = run.media("mmse_curve")
    assert curve["columns"] == ["logsnr", "series", "mmse"]
    series = {r[1] for r in curve["data"]}
    assert {"m0", figures.MMSEData.REFERENCE, figures.MMSEData.STANDARD,
            figures.MMSEData.GAUSSIAN_DECODER} <= series
    assert all(isinstance(r[2], float) for r in curve["data"])
    # per-image values: histograms and the table behind the IT-vs-VLB scatter
    assert run.media_type("histogram/it_continuous_bpd") == "histogram"
    assert run.media_type("histogram/vlb_bpd") == "histogram"
    assert run.media_type("per_image") == "table-file"
    table = run.media("per_image")
    assert table["columns"][:2] == ["index", "it_continuous_bpd"] and len(table["data"]) == 4
    per_image = artifacts.read_per_image(tmp_path / "ev1" / artifacts.PER_IMAGE)
    np.testing.assert_allclose([r[1] for r in table["data"]],
                               run_figures.per_image_bpd(per_image, 3072)["it_continuous_bpd"])
    # the evaluation artifact: metrics.json and per_image.npz
    [art] = [a for a in run.artifacts if a.type == "evaluation"]
    assert art.name == "evaluate-ev1"
    assert {f.path for f in art.manifest.contents} == {"metrics.json", "per_image.npz"}
    # the pixel maps of the first 2 images sum to their continuous estimates
    maps = per_image.pixel_maps
    assert maps["nats"].shape == (1, 2, 3072)
    np.testing.assert_allclose(maps["nats"][0].sum(-1).numpy(),
                               per_image.estimates["it_continuous_nats"][0, :2].numpy(), rtol=1e-6)


def test_finetune_resumes_its_wandb_run_and_an_evaluation_uses_its_model(wb_cfg, tmp_path):
    common = ("model=iddpm_tiny", "finetune=smoke_base", "finetune.init=scratch", "finetune.batch_size=4",
              "finetune.heldout_images=2", "finetune.run_name=ft", "run_id=ft", "data.num_train_images=8")
    first = finetune.run(wb_cfg(*common, "finetune.max_steps=1"), tmp_path / "ft1")
    second = finetune.run(wb_cfg(*common, "finetune.max_steps=2"), tmp_path / "ft2")  # continues the run
    assert second["steps"] == 2 and first["steps"] == 1
    runs = by_job(tmp_path, "finetune")
    assert len(runs) == 2 and runs[0].id == runs[1].id  # one wandb run, resumed
    assert all(r.name == "finetune-ft" for r in runs)
    assert {"smoke", "iddpm_tiny", "iddpm"} <= set(runs[0].tags)
    assert runs[0].config["finetune"]["max_steps"] == 1 and "estimator" not in runs[0].config
    model_arts = [a for r in runs for a in r.artifacts if a.type == "model"]
    assert model_arts and all(a.name == "model-ft" for a in model_arts)
    record = json.loads((tmp_path / "checkpoints" / "finetune" / "ft" / "wandb_artifact.json").read_text())
    sha = artifacts.file_sha256(tmp_path / "checkpoints" / "finetune" / "ft" / "model.pt")
    assert record["model.pt"] == {"name": "model-ft", "alias": f"sha256-{sha[:12]}", "sha256": sha}
    assert f"sha256-{sha[:12]}" in model_arts[-1].aliases

    model = tmp_path / "checkpoints" / "finetune" / "ft" / "model.pt"
    evaluate.run(wb_cfg(f"model.checkpoint={model}", "run_id=ev2", "estimator.pixel_maps=0"),
                 tmp_path / "ev2")
    [ev] = by_job(tmp_path, "evaluate")
    link = f"model-ft:sha256-{sha[:12]}"
    assert ev.config["inputs"] == [{"artifact": link, "type": "model"}]  # offline: lineage as metadata
    [art] = [a for a in ev.artifacts if a.type == "evaluation"]
    assert json.loads(art.metadata)["uses"] == [link]


def test_a_stats_run_from_the_cli_logs_the_groups_it_reads(tmp_path):
    proc = run_cli("stats", *TINY, "logger=wandb", "logger.mode=offline", f"logger.dir={tmp_path / 'wb'}",
                   "run_id=st", *path_overrides(tmp_path), cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [run] = by_job(tmp_path, "stats")
    groups = {k for k, v in run.config.items() if isinstance(v, dict) and k != "_wandb"}
    assert groups == {"paths", "data", "logger"}
    assert run.config["data"]["stats_images"] == 40 and run.config["seed"] == 0  # top-level keys stay


def test_wandb_variables_are_honoured_and_explicit_config_wins(wb_cfg, tiny_checkpoints, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_TAGS", "a,b")
    cfg = wb_cfg(f"model.checkpoint={tiny_checkpoints[0]}", "estimator.pixel_maps=0", "estimator.vlb=false")
    assert cfg.logger.project == "from-env"
    assert wb_cfg("logger.project=explicit").logger.project == "explicit"
    evaluate.run(cfg, tmp_path / "a")
    [run] = by_job(tmp_path, "evaluate")
    assert run.project == "from-env" and {"a", "b"} <= set(run.tags)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = wb_cfg(f"model.checkpoint={tiny_checkpoints[0]}", "estimator.pixel_maps=0", "estimator.vlb=false")
    evaluate.run(cfg, tmp_path / "b")
    assert len(by_job(tmp_path, "evaluate")) == 1  # disabled: no run at all


def test_report_tables_are_numeric_and_its_figures_agree_with_the_tables(wb_cfg, tiny_checkpoints, tmp_path):
    from PIL import Image

    from fake_runs import commit_fake_evaluation
    from itdiffusion.stages import report

    common = ("data.num_images=16", "estimator.npoints=16", "estimator.pixel_maps=2")
    for run_id, ckpt, row in (("base", 0, "IDDPM"), ("tuned", 1, "IDDPM(tune)")):
        evaluate.run(wb_cfg(f"model.checkpoint={tiny_checkpoints[ckpt]}", f"run_id={run_id}",
                            f"paper_row='{row}'", *common), tmp_path / "outputs" / "evaluate" / run_id)
    masked = tmp_path / "outputs" / "evaluate" / "masked"  # a masked-diffusion run's metrics
    commit_fake_evaluation(masked, {"run_id": "masked", "group": "g", "label": "mdm", "created": "x",
                                    "num_images": 2, "mdce_bpd": 3.5, "mdce_bpd_stderr": 0.1,
                                    "mdce_timefree_bpd": 3.4, "mdce_timefree_bpd_stderr": 0.1})
    out = report.run(wb_cfg("run_id=rep"), tmp_path / "rep")

    # the gap figure's numbers give each table's continuous estimate (within its standard error)
    for run_id in ("base", "tuned"):
        check = out["figure_checks"][run_id]
        assert abs(check["figure_bpd"] - check["table_bpd"]) < check["table_stderr"]
    names = {Path(f).stem for f in out["figures"]["g"]}
    assert {"g_mmse", "g_mmse_gap", "g_per_image", "g_pixel_maps"} <= names
    for fig in out["figures"]["g"]:
        with Image.open(tmp_path / "outputs" / "results" / fig) as im:
            assert im.format == "PNG" and np.asarray(im.convert("L")).std() > 5

    [rep] = by_job(tmp_path, "report")
    assert rep.name == "report-rep"
    table1 = rep.media("g/table1_continuous")
    cols = table1["columns"]
    assert cols[:3] == ["model", "run_id", "training_objective"]
    itd = "it_continuous_itd_range"
    assert {itd, f"{itd}_stderr", f"{itd}_paper", f"{itd}_diff", "it_continuous"} <= set(cols)
    base = next(r for r in table1["data"] if r[1] == "base")
    row = dict(zip(cols, base, strict=True))
    metrics = json.loads((tmp_path / "outputs" / "evaluate" / "base" / "metrics.json").read_text())
    assert row["it_continuous"] == pytest.approx(metrics["it_continuous_bpd"])
    assert row[itd] == pytest.approx(metrics["it_continuous_itd_range_bpd"])
    assert row[f"{itd}_paper"] == -4.09
    assert row[f"{itd}_diff"] == pytest.approx(metrics["it_continuous_itd_range_bpd"] + 4.09)
    assert all(isinstance(row[c], float) for c in cols if c.startswith(itd))  # the paper column: numbers
    assert isinstance(row["it_continuous"], float) and isinstance(row["it_continuous_stderr"], float)
    assert rep.media("g/table2_discrete")["columns"][2:6] == ["vlb", "vlb_stderr", "vlb_paper", "vlb_diff"]
    imdce = rep.media("g/imdce")
    assert [r[1] for r in imdce["data"]] == ["masked"] and imdce["data"][0][3] == 3.5
    assert rep.media("figure_checks")["columns"][:3] == ["run_id", "figure_bpd", "table_bpd"]
    assert {"evaluate-base:latest", "evaluate-tuned:latest"} <= {i["artifact"] for i in rep.config["inputs"]}
    assert rep.media_type("g/mmse_gap") == "image-file"
