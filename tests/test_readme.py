"""README.md stays a true map: at most 250 lines, every command in its code blocks run by a test (or by
the demo), and every relative link in README.md and docs/*.md pointing at a file (and heading) that exists.

A README command counts as run when it is the test command, the demo command, an install line that CI
(.ci/run) runs, or when one test file, read together with the test modules it imports (train_harness,
test_posttrain, ...: the helpers that build its command lines), or doge/demo.py holds as string literals
its entry point (`"doge/train.py"`, `"doge.export"`, `"slurm/prepare.sh"`), its launcher (`"deepspeed"`,
`"torchrun"`, `"sbatch"`) and every `--flag` it uses, and names every environment setting it makes
(`DATA=...`). Repository paths in a command, and `doge.X` modules, must exist.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_LINES = 250
TEST_COMMAND = "python -m pytest -q tests"
DEMO_COMMAND = "python -m doge.demo"
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
OTHER_FENCES = {"text", "python", "yaml", "json"}
LAUNCHERS = {"deepspeed", "torchrun", "sbatch", "srun"}
PYTHONS = {"python", "python3"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
REPO_DIRS = ("doge/", "data_tools/", "recipes/", "ds_configs/", "slurm/", "benchmarks/", "tests/", "docs/")
FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced block."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        match = FENCE.match(line)
        if lang is None and match:
            lang, lines = match.group(1).lower(), []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, "a code block is not closed"
    return blocks


def shell_commands(lines: list[str]) -> list[list[str]]:
    """Simple commands (token lists) of shell lines: continuations joined, comments dropped, split at
    `&&`, `||`, `;`, `|`."""
    joined, logical = "", []
    for line in lines:
        joined += line
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        logical.append(joined)
        joined = ""
    logical.append(joined)
    out = []
    for line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in SEPARATORS:
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    return [command for command in out if command]


@dataclass
class Command:
    text: str
    entry: str = ""
    launcher: str = ""
    env: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def parse(tokens: list[str]) -> Command:
    """The entry point (script path or `python -m` module), launcher, settings and flags of a command."""
    cmd, rest = Command(" ".join(tokens)), list(tokens)
    while rest and ASSIGNMENT.match(rest[0]):
        cmd.env.append(ASSIGNMENT.match(rest.pop(0)).group(1))
    program = rest.pop(0) if rest else ""
    if program in PYTHONS and rest[:1] == ["-m"]:
        cmd.entry = rest[1]
    elif program in PYTHONS:
        cmd.entry = rest[0] if rest else program
    elif program in LAUNCHERS:
        cmd.launcher = program
        cmd.entry = next((t for t in rest if t.endswith((".py", ".sh"))), "")
    else:
        cmd.entry = program
    cmd.flags = [t.split("=", 1)[0] for t in rest if t.startswith("--")]
    cmd.paths = [t for t in rest if t.startswith(REPO_DIRS)]
    return cmd


def literal(text: str) -> re.Pattern:
    """`text` as a whole string literal."""
    return re.compile(r"[\"']" + re.escape(text) + r"[\"']")


def flag_literal(flag: str) -> re.Pattern:
    """`flag` at the start of a string literal (`"--seq-len"`, f"--nodes={n}", "--seq-len 64 ...")."""
    return re.compile(r"[\"']" + re.escape(flag) + r"(?=[\"'=\s{])")


def sources() -> dict[str, str]:
    """Where a command counts as run: every test module but this one, and the demo."""
    out = {p.stem: p.read_text() for p in sorted((REPO / "tests").glob("*.py")) if p.name != Path(__file__).name}
    out["doge.demo"] = (REPO / "doge" / "demo.py").read_text()
    return out


def closure(name: str, texts: dict[str, str]) -> str:
    """A test module's source with the test modules it imports, transitively."""
    seen, todo = [], [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        for imported in re.findall(r"^(?:import|from) (\w+)", texts[current], re.M):
            if imported in texts:
                todo.append(imported)
    return "\n".join(texts[n] for n in seen)


def ci_installs() -> list[list[str]]:
    """The arguments of every `pip install` CI runs, without -q."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    return [[t for t in c[1:] if t != "-q"] for c in shell_commands(ci) if c and Path(c[0]).name == "pip"]


def why_not_run(tokens: list[str], texts: dict[str, str]) -> str | None:
    """None if the command is run by a test (see the module docstring), else what is missing."""
    text = " ".join(tokens)
    if text in (TEST_COMMAND, DEMO_COMMAND):
        return None
    if tokens[0] == "pip":
        return None if tokens[1:] in ci_installs() else f"{text}: not an install .ci/run makes"
    cmd = parse(tokens)
    modules = [cmd.entry.replace(".", "/") + ".py"] if cmd.entry.startswith("doge.") else []
    missing_paths = [p for p in cmd.paths + modules if not (REPO / p.rstrip("/")).exists()]
    if missing_paths:
        return f"{text}: no such file in the repository: {missing_paths}"
    if not cmd.entry:
        return f"{text}: no entry point (script or module) found"
    closures = {name: closure(name, texts) for name in texts}
    holders = [name for name, src in closures.items() if literal(cmd.entry).search(src)]
    if not holders:
        return f"{text}: no test runs {cmd.entry}"
    best = None
    for name in holders:
        src = closures[name]
        missing = [f for f in cmd.flags if not flag_literal(f).search(src)]
        missing += [e for e in cmd.env if not re.search(rf"\b{e}\b", src)]
        if cmd.launcher and not literal(cmd.launcher).search(src):
            missing.append(cmd.launcher)
        if not missing:
            return None
        best = missing if best is None or len(missing) < len(best) else best
    return f"{text}: the tests that run {cmd.entry} ({', '.join(holders)}) never use {best}"


def readme_commands() -> list[list[str]]:
    out = []
    for lang, lines in code_blocks(README.read_text()):
        assert lang in SHELL_FENCES | OTHER_FENCES, f"README code block of unknown language {lang!r}"
        if lang in SHELL_FENCES:
            out += shell_commands(lines)
    return out


def test_readme_is_a_map_of_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move explanations and figures into docs/"


def test_readme_shows_the_test_and_demo_commands():
    commands = [" ".join(c) for c in readme_commands()]
    assert TEST_COMMAND in commands and DEMO_COMMAND in commands


def test_every_readme_command_is_run_by_a_test_or_the_demo():
    texts = sources()
    problems = [why for why in (why_not_run(c, texts) for c in readme_commands()) if why]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command, runs", [
    ("python data_tools/prepare.py --input corpus/ --tokenizer tok/ --seq-len 2048 --output data/x", True),
    ("python data_tools/prepare.py --input corpus/ --no-such-flag --output data/x", False),
    ("python doge/atomic.py", False),                                       # a file no test runs
    ("python -m doge.export runs/x/checkpoints/step-00000010 out", True),
    ("python -m doge.no_such_tool runs/x", False),
    ("deepspeed doge/train.py --deepspeed ds_configs/zero9.json --data d --output o", False),  # no such file
    ("DATA=/d RUN_DIR=/r sbatch --nodes=2 slurm/pretrain_20m.sh", True),
    ("NOT_A_SETTING=1 sbatch slurm/pretrain_20m.sh", False),
    ("pip install -e .[dev]", True),
    ("pip install -e .[everything]", False),
])
def test_the_matching_tells_run_commands_from_the_rest(command, runs):
    tokens = shell_commands([command])[0]
    assert (why_not_run(tokens, sources()) is None) == runs, why_not_run(tokens, sources())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, counts, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            base = slug(line.lstrip("#"))
            out.add(base if base not in counts else f"{base}-{counts[base]}")
            counts[base] = counts.get(base, 0) + 1
    return out


def pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_a_file_in_the_repository(page):
    bad = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(REPO) or not file.exists():
            bad.append(f"{target}: no such file in the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not bad, "\n".join(bad)
