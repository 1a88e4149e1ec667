"""A launcher or sweeper whose optional extra is not installed: one line naming the pip install, exit 2,
before Hydra starts (instead of Hydra's "Could not load 'hydra/launcher/submitit_slurm'")."""

from __future__ import annotations

import pytest

from conftest import REPO, run_cli
from itdiffusion import extras
from itdiffusion.errors import UserError

# a Python start-up hook that hides the extras' modules, as in an environment without them
HIDE = '''import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name in {names!r}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
'''


def hint(extra: str, why: str) -> str:
    return (f"{why} needs {extras.EXTRAS[extra][1]}, which is not installed: pip install \".[{extra}]\" in a "
            f"checkout (pip install \"itdiffusion[{extra}]\" for an installed package)")


@pytest.mark.parametrize(("stage", "overrides", "extra", "why"), [
    ("stats", ["-m", "hydra/launcher=slurm"], "slurm", "hydra/launcher=slurm"),
    ("finetune", ["hparams_search=finetune_lr"], "search", "hparams_search=finetune_lr"),
])  # (every choice that needs an extra: test_installed_extras_pass_and_other_choices_are_not_checked)
def test_the_cli_names_the_extra_to_install(tmp_path, stage, overrides, extra, why):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HIDE.format(names={m for m, _ in extras.EXTRAS.values()}))
    proc = run_cli(stage, *overrides, "logger=none", cwd=tmp_path, timeout=120,
                   env={"PYTHONPATH": f"{hook}:{REPO / 'src'}"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: {hint(extra, why)}"]
    assert not (tmp_path / "outputs").exists()


def test_installed_extras_pass_and_other_choices_are_not_checked(monkeypatch):
    extras.check_extras(["hydra/launcher=slurm", "hparams_search=estimator", "hydra/launcher=basic"])
    monkeypatch.setattr(extras, "installed", lambda extra: False)
    extras.check_extras(["hydra/launcher=basic", "hparams_search=null", "model=iddpm_tiny", "-m"])
    for override, extra in [("+hydra/launcher=submitit_slurm", "slurm"),
                            ("hydra/launcher=submitit_local", "slurm"),
                            ("hydra/sweeper=optuna", "search"), ("hparams_search=estimator", "search")]:
        with pytest.raises(UserError, match=rf'^{override.lstrip("+")} needs .* pip install "\.\[{extra}\]"'):
            extras.check_extras(["-m", override])
