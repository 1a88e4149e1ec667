"""The library's import graph: no cycle between modules, no import of the stages from the library, and no
side effect of importing any module (Hydra's ConfigStore and resolvers, os.environ, files, logging
handlers unchanged)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "itdiffusion"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (module level, functions, TYPE_CHECKING),
    each with the packages that run on the way (importing ``a.b.c`` runs ``a.b``'s ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module, else a name of pkg
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found = set(targets)
    for target in targets:  # the packages that run on the way, except those this module runs inside
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    found -= ancestors - targets
    return {t for t in found if t in known and t != name and t != "itdiffusion"}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "itdiffusion"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from itdiffusion.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    known = {"itdiffusion", "itdiffusion.a", "itdiffusion.sub", "itdiffusion.sub.b"}
    edges = {
        "itdiffusion.a": imported("itdiffusion.a", pkg / "a.py", known),
        "itdiffusion.sub.b": imported("itdiffusion.sub.b", pkg / "sub" / "b.py", known),
        "itdiffusion.sub": set(),
    }
    assert edges["itdiffusion.a"] == {"itdiffusion.sub", "itdiffusion.sub.b"}
    assert edges["itdiffusion.sub.b"] == {"itdiffusion.a"}
    assert find_cycle(edges) == ["itdiffusion.a", "itdiffusion.sub.b", "itdiffusion.a"]


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_stages():
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in graph().items()
        if not name.startswith("itdiffusion.stages")
        for target in targets
        if target.startswith("itdiffusion.stages")
    )
    assert not upward


PROBE = r"""
import importlib, json, logging, os, sys
from pathlib import Path

def handlers():
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                        if isinstance(v, logging.Logger)]
    return {l.name: len(l.handlers) for l in loggers if l.handlers}

def files(root):
    return sorted(str(p) for p in Path(root).rglob("*"))

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
import torch  # third-party state is not ours to check: import the heavy libraries first
before = (json.dumps(ConfigStore.instance().repo, default=str, sort_keys=True), dict(os.environ),
          handlers(), files(os.getcwd()), files(sys.argv[2]),
          sorted(OmegaConf._get_resolver.__self__.__dict__) if False else None)
resolvers = {n for n in ("itd_run_id", "itd_settings_hash", "itd_sweep_id") if OmegaConf.has_resolver(n)}
problems = []
for name in sys.argv[1].split(","):
    importlib.import_module(name)
    after = (json.dumps(ConfigStore.instance().repo, default=str, sort_keys=True), dict(os.environ),
             handlers(), files(os.getcwd()), files(sys.argv[2]), None)
    labels = ("ConfigStore", "os.environ", "logging handlers", "files in the working dir",
              "files in the package")
    for label, b, a in zip(labels, before, after):
        if a != b:
            problems.append(f"{name}: {label} changed")
    now = {n for n in ("itd_run_id", "itd_settings_hash", "itd_sweep_id") if OmegaConf.has_resolver(n)}
    if now != resolvers:
        problems.append(f"{name}: OmegaConf resolvers registered: {sorted(now - resolvers)}")
    before, resolvers = after, now
print(json.dumps(problems))
"""


def test_importing_any_module_has_no_side_effects(tmp_path):
    names = sorted(modules())
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC), "HOME": str(tmp_path),
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7",
           "SLURM_STEP_ID": "0", "SLURM_NODELIST": "node1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, ",".join(names), str(PACKAGE)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    problems = json.loads(done.stdout.strip().splitlines()[-1])
    assert not problems, "\n".join(problems)


def test_discrete_estimators_do_not_import_the_models():
    """models/ builds networks over discrete/'s tokens and estimators; never the other way round."""
    upward = sorted(f"{name} -> {target}" for name, targets in graph().items()
                    if name.startswith("itdiffusion.discrete") for target in targets
                    if target.startswith("itdiffusion.models"))
    assert not upward


def test_the_stages_never_test_the_model_kind():
    """A family is defined in the registry alone (itdiffusion.models.families): no stage names a kind."""
    import re

    pattern = re.compile(r"model.kind|\.kind ==")
    found = [f"{path.name}:{n}" for path in sorted((PACKAGE / "stages").glob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found
