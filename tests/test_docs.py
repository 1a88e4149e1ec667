"""The documentation's links resolve: README.md and docs/*.md link only to files, folders and headings
that exist in the repository, the README stays a front door, and no page cites a file the repository lacks.
Every command they show composes: each ``key=value`` override of a command in their code blocks (and of the
commands written inline, `python -m itdiffusion.stages...` / `itdiffusion-<stage> ...`) names an existing
config key or a valid group option, with a value of the key's type, as Hydra composes it for the stage
(a sweep ``a=1,2``: its first value; the Optuna sweeper and the submitit launchers only where their extras
are installed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from itdiffusion.errors import UserError
from itdiffusion.extras import check_extras
from itdiffusion.stages import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
MISSING_DOC = "DES" + "IGN.md"  # design notes outside the repository (split: a grep finds no citation)

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a repository path written inline (`scripts/x.py`, docs/x.md, src/...), relative to the repository root
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:docs|scripts|src|tests|benchmarks)/[^\s`'\"()\[\],;|]*)")
PLACEHOLDER = set("*{}$<>")


def doc_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in split_fences(path.read_text(encoding="utf-8"))[0]:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, repo: Path = REPO) -> list[str]:
    """Every relative link or inline repository path of ``path`` that does not resolve, as readable lines."""
    text = path.read_text(encoding="utf-8")
    prose, code = split_fences(text)
    problems = []
    for line in prose:
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, fragment = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{path.name}: link {target!r}: {file_part} does not exist")
            elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
                problems.append(f"{path.name}: link {target!r}: no heading #{fragment} in {dest.name}")
    for line in prose + code:
        for raw in REPO_PATH.findall(line):
            candidate = raw.partition("#")[0].rstrip(".:")  # a #fragment is the link check's business
            if PLACEHOLDER & set(candidate):
                continue
            if not (repo / candidate).exists():
                problems.append(f"{path.name}: path {candidate!r} does not exist in the repository")
    return problems


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_repository_path_resolves(doc):
    assert broken_links(doc) == []


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_docs_page_is_in_the_index():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert pages and all(f"({page})" in index for page in pages)


def test_no_page_or_module_cites_a_file_the_repository_lacks():
    assert not (REPO / MISSING_DOC).exists()
    files = doc_files() + [p for d in ("src", "scripts", "tests") for p in (REPO / d).rglob("*")
                           if p.suffix in {".py", ".yaml", ".sh", ".sbatch", ".md"}] + [REPO / "Makefile"]
    citing = [str(p.relative_to(REPO)) for p in files if MISSING_DOC in p.read_text(encoding="utf-8")]
    assert citing == []


def test_the_checker_finds_broken_links(tmp_path):
    """The checks above can fail: a page with a missing file, a missing heading and a missing inline path."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "there.py").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Title\n\n## A section (`x=y`)\n\n"
                    "[ok](#a-section-xy) [ok](../scripts/there.py) `scripts/there.py` [web](https://example.org)\n"
                    "[gone](missing.md) [no anchor](#nowhere) [no anchor](page.md#title-2)\n"
                    "`scripts/gone.py` `scripts/bench_*.py` `src/<placeholder>/x.py`\n", encoding="utf-8")
    problems = broken_links(page, repo=tmp_path)
    assert len(problems) == 4, problems
    assert any("missing.md" in p for p in problems) and any("#nowhere" in p for p in problems)
    assert any("#title-2" in p for p in problems) and any("scripts/gone.py" in p for p in problems)


# Commands and their overrides

# what starts a command whose arguments are Hydra overrides (the stages, the scripts that pass theirs on)
COMMAND = re.compile(r"(?:-m itdiffusion\.stages\.\w+|\bitdiffusion-(?:stats|evaluate|finetune|report)\b"
                     r"|scripts/reproduce\.sh|scripts/slurm\.sbatch|\bmake \w[\w-]*)(?P<args>.*)")
OVERRIDE = re.compile(r"^[+~]?[a-z_][\w.]*(?:/\w+)?=")  # lower case: VAR=value is the environment's
INLINE = re.compile(r"`([^`]+)`")
FILL_IN = re.compile(r"<[^<>\s]*>")
# a family that only a plug-in outside the package defines (docs/models.md's example of adding one)
PLUGIN_EXAMPLE = "hydra.searchpath="


def command_lines(text: str) -> list[tuple[str, str]]:
    """(where, command) for every command in ``text``'s code blocks and inline code: continuation lines
    joined, a ``$ `` prompt dropped."""
    prose, code = split_fences(text)
    found, joined = [], ""
    for line in code:
        joined += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            found.append(("code block", joined.strip().removeprefix("$ ")))
            joined = ""
    for paragraph in "\n".join(prose).split("\n\n"):
        found += [("inline", span) for span in INLINE.findall(paragraph.replace("\n", " "))]
    return [(where, cmd) for where, cmd in found if COMMAND.search(cmd)]


def overrides_of(command: str) -> list[str]:
    """The Hydra overrides a documented command passes (``make ... ARGS="..."``: those in ARGS)."""
    args = COMMAND.search(command).group("args")
    try:
        tokens = shlex.split(args, comments=True)
    except ValueError:  # a command inside a quoted shell expression: eval "$(itdiffusion-evaluate ...)"
        tokens = args.split()
    out, skip = [], False
    for token in tokens:
        if skip:  # -sc install=bash: Hydra's shell completion, not an override
            skip = False
        elif token in ("-sc", "--shell-completion"):
            skip = True
        elif token.startswith("ARGS="):
            out += overrides_of("make x " + token.removeprefix("ARGS="))
        elif OVERRIDE.match(token):
            out.append(FILL_IN.sub("x", token))  # <run_name>: a name the reader fills in
    return out


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A sweep ``key=a,b`` as its first job's ``key=a``; other overrides as written."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
            else text for o, text in zip(parsed, overrides, strict=True)]


def documented_commands(files: list[Path] | None = None) -> list[tuple[str, list[str]]]:
    commands = []
    for path in files or doc_files():
        for where, command in command_lines(path.read_text(encoding="utf-8")):
            overrides = overrides_of(command)
            if overrides and not any(o.startswith(PLUGIN_EXAMPLE) for o in overrides):
                commands.append((f"{path.name} ({where}): {command}", overrides))
    return commands


def compose_problem(overrides: list[str]) -> str | None:
    """None when Hydra composes ``overrides`` (hydra.* keys included), else its message."""
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            compose("config", overrides=first_of_sweeps(overrides), return_hydra_config=True)
    except Exception as e:  # Hydra's and OmegaConf's errors: a key, an option or a value it rejects
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


COMMANDS = documented_commands()


def test_the_docs_show_commands_with_overrides():
    assert len(COMMANDS) >= 30  # the extraction finds them (README, pipeline, configuration, models, ...)


@pytest.mark.parametrize(("where", "overrides"), COMMANDS, ids=[c[0][:90] for c in COMMANDS])
def test_every_documented_override_composes(where, overrides):
    try:
        check_extras(overrides)
    except UserError as e:
        pytest.skip(str(e))
    assert compose_problem(overrides) is None, f"{where}: {compose_problem(overrides)}"


def test_the_checker_finds_a_misspelled_key_and_option(tmp_path):
    """The check above can fail: a misspelled key, an unknown group option, a value of the wrong type."""
    page = tmp_path / "page.md"
    page.write_text("# T\n\n```bash\n"
                    "python -m itdiffusion.stages.evaluate experiment=smoke estimator.npoint=5\n"
                    "itdiffusion-finetune model=iddpm_tinny \\\n    finetune.lr=1e-4\n```\n\n"
                    "Inline: `python -m itdiffusion.stages.stats\ndata.stats_images=many`; "
                    "`make reproduce ARGS=\"-m estimator.npoints=500,1000 estimator.clipp=3\"`; "
                    "`make smoke MODELS=ddpm` and `estimator.npoints=8` are fine.\n", encoding="utf-8")
    commands = documented_commands([page])
    assert [c[1] for c in commands] == [["experiment=smoke", "estimator.npoint=5"],
                                        ["model=iddpm_tinny", "finetune.lr=1e-4"], ["data.stats_images=many"],
                                        ["estimator.npoints=500,1000", "estimator.clipp=3"]]
    problems = [compose_problem(overrides) for _, overrides in commands]
    assert all(problems), problems
    assert "npoint" in problems[0] and "iddpm_tinny" in problems[1] and "clipp" in problems[3]
