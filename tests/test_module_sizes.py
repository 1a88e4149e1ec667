"""Small modules with one job: no module of the package grows past MAX_LINES, and the evaluate stage stays an
orchestrator over the library (itdiffusion.evaluation) within MAX_STAGE_LINES."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "itdiffusion"
MAX_LINES = 400
MAX_STAGE_LINES = 200


def line_counts() -> dict[str, int]:
    return {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_counts_cover_every_module_of_the_package():
    counts = line_counts()
    assert {"training/loop.py", "results/store.py", "config/schema.py", "evaluation.py"} <= set(counts)
    assert counts["stages/evaluate.py"] > 50  # the stage itself is counted, not an empty stand-in


def test_no_module_is_over_the_limit():
    over = {name: n for name, n in line_counts().items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by job): {over}"


def test_the_evaluate_stage_is_an_orchestrator():
    n = line_counts()["stages/evaluate.py"]
    assert n <= MAX_STAGE_LINES, (f"stages/evaluate.py has {n} lines (at most {MAX_STAGE_LINES}): move the "
                                  "library work into itdiffusion.evaluation")
