"""Every command block of README.md and docs/*.md runs as written.

A document's blocks run in order in one empty folder of their own (``examples/``, ``benchmarks/``, ``scripts/`` and
``src/`` linked in, ``.venv`` naming this interpreter's environment, ``fedmomentum``/``python``/``flwr`` on the PATH):

- ``bash`` blocks run as one bash script (``set -e``; background jobs are waited for); a command followed by a
  ``# error: ...`` comment line must fail with exit status 2 and print exactly that line last;
- unlabelled blocks whose lines start with ``$ `` are transcripts: each ``$ command`` runs, and the ``error: ...``
  line after it must be the last line it prints (exit status 2);
- ``python`` blocks run with this interpreter;
- other blocks (TOML, JSON, output) are not run.

An HTML comment just above a block's opening fence changes that (several may stand there):

- ``<!-- doc-test: skip REASON -->``: not run; the test is skipped with the reason (a GPU, other machines);
- ``<!-- doc-test: tiny -->``: every ``fedmomentum run | compare | study`` command of the block that starts a run
  gets ``TINY`` appended (the small random model and a few examples: the same command, in seconds);
- ``<!-- doc-test: replace 'OLD' 'NEW' -->``: the block runs with ``OLD`` replaced by ``NEW`` (a smaller variant);
- ``<!-- doc-test: file NAME -->``: the block is written to ``NAME`` before the document's blocks run;
- ``<!-- doc-test: before 'COMMAND' -->``: a shell command run first (to make what a transcript expects);
- ``<!-- doc-test: env NAME='VALUE' -->``: an environment variable for the block;
- ``<!-- doc-test: cpu-only -->``: skipped on a machine with CUDA (the block shows a CPU machine's message).

Running the blocks trains dozens of tiny runs, so they are ``slow``; ``test_every_block_is_understood`` (fast)
checks that every block and marker parses.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = ("examples", "benchmarks", "scripts", "src", "pyproject.toml")
TINY_SETS = ("--set train_per_family=4 --set eval_per_family=2 --set max_length=48 --set batch_size=2 "
             "--set accuracy_per_family=1 --set max_new_tokens=2")
TINY = {"run": f"--model tiny --local-steps 1 {TINY_SETS}", "compare": f"--model tiny --local-steps 1 {TINY_SETS}",
        "study": f"--set model=tiny --set local_steps=1 --set rounds=1 {TINY_SETS}"}
MARKS = ("skip", "tiny", "replace", "file", "before", "env", "cpu-only")
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*doc-test:\s*(\S+)\s*(.*?)\s*-->\s*$")
STARTS_RUN = re.compile(r"^\s*(?:[A-Z_]+=\S+\s+)*fedmomentum\s+(run|compare|study)\b")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marks: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def mark(self, kind: str) -> list[str]:
        return [value for key, value in self.marks if key == kind]

    @property
    def kind(self) -> str:
        if self.mark("file"):
            return "file"
        if self.lang in ("bash", "sh", "shell"):
            return "bash"
        if self.lang == "python":
            return "python"
        if self.lang == "" and any(line.startswith("$ ") for line in self.text.splitlines()):
            return "transcript"
        return "text"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, each with the ``doc-test`` markers just above it."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        marks, above = [], index - 1
        while above >= 0 and MARK.match(lines[above]):
            kind, value = MARK.match(lines[above]).groups()
            marks.insert(0, (kind, value))
            above -= 1
        found.append(Block(path, index + 1, opening.group(1), "\n".join(lines[index + 1:end]) + "\n", marks))
        index = end + 1
    return found


ALL = [block for path in DOCS for block in blocks(path)]
RUN = [block for block in ALL if block.kind in ("bash", "python", "transcript")]


def test_every_block_is_understood():
    """Every marker is one the runner knows, skips give a reason, replacements are found in their block, and every
    command block is run or skipped with a reason."""
    assert RUN, "no command blocks found"
    for block in ALL:
        for kind, value in block.marks:
            assert kind in MARKS, f"{block.name}: unknown marker {kind!r}"
            if kind == "skip":
                assert value, f"{block.name}: a skip needs its reason"
            if kind == "replace":
                old, new = shlex.split(value)
                assert old in block.text, f"{block.name}: {old!r} is not in the block"
            if kind == "env":
                assert re.fullmatch(r"[A-Z_]+=.*", value), f"{block.name}: env NAME=VALUE"
        if block.kind == "bash" and not block.mark("skip"):
            assert "\t" not in block.text, block.name
        if block.mark("tiny"):
            assert any(STARTS_RUN.match(line) for line in _logical(block.text)), f"{block.name}: nothing to shrink"


def _logical(text: str) -> list[str]:
    """The block's lines with ``\\`` continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


def _tiny(command: str) -> str:
    """``command`` with the tiny settings appended when it starts a run (before a trailing comment or ``&``)."""
    found = STARTS_RUN.match(command)
    if not found or "--resume" in command.split():
        return command
    body, comment = re.match(r"^(.*?)(\s+#\s.*)?$", command).groups()
    background = body.rstrip().endswith("&")
    body = body.rstrip().removesuffix("&").rstrip()
    return f"{body} {TINY[found.group(1)]}" + (" &" if background else "") + (comment or "")


def _prepared(block: Block) -> str:
    text = block.text
    for value in block.mark("replace"):
        old, new = shlex.split(value)
        text = text.replace(old, new)
    return text


def workspace(path: Path, folder: Path) -> Path:
    """``folder`` made ready for the blocks of document ``path``: the project linked in, its ``file`` blocks
    written."""
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    for block in blocks(path):
        for name in block.mark("file"):
            (folder / name).write_text(block.text, encoding="utf-8")
    return folder


def _env(block: Block) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                              os.environ.get("PYTHONPATH")]))}
    for value in block.mark("env"):
        name, _, text = value.partition("=")
        env[name] = shlex.split(text)[0] if text else ""
    return env


def _shell(script: str, cwd: Path, env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _expect_error(command: str, expected: str, cwd: Path, env: dict, where: str) -> None:
    done = _shell(command, cwd, env)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    assert done.returncode == 2 and last == expected, (f"{where}: `{command}` exited {done.returncode}; expected "
                                                       f"{expected!r}\ngot {last!r}\n{done.stdout[-2000:]}")


def _run_bash(block: Block, cwd: Path, env: dict) -> None:
    commands = _logical(_prepared(block))
    if block.mark("tiny"):
        commands = [_tiny(command) for command in commands]
    pending: list[str] = []

    def flush() -> None:
        if pending:
            script = "set -eo pipefail\n" + "\n".join(pending) + "\nwait\n"
            done = _shell(script, cwd, env)
            assert done.returncode == 0, (f"{block.name} failed ({done.returncode}):\n{script}\n--- stdout\n"
                                          f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
            pending.clear()

    for index, command in enumerate(commands):
        following = commands[index + 1].strip() if index + 1 < len(commands) else ""
        if following.startswith("# error: "):
            flush()
            _expect_error(command, following[2:], cwd, env, block.name)
        elif not command.strip().startswith("# error: "):
            pending.append(command)
    flush()


def _run_transcript(block: Block, cwd: Path, env: dict) -> None:
    lines = _prepared(block).splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("$ "):
            continue
        command = line[2:]
        if block.mark("tiny"):
            command = _tiny(command)
        shown = []
        for after in lines[index + 1:]:
            if after.startswith("$ "):
                break
            shown.append(after)
        errors = [text for text in shown if text.startswith("error: ")]
        if errors:
            _expect_error(command, errors[-1], cwd, env, block.name)
        else:
            done = _shell(command, cwd, env)
            assert done.returncode == 0, f"{block.name}: `{command}`\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def _skipped(block: Block) -> str | None:
    """Why ``block`` is not run here, or None."""
    for reason in block.mark("skip"):
        return reason
    if block.mark("cpu-only"):
        import torch

        if torch.cuda.is_available():
            return "the block shows what a machine without CUDA prints"
    return None


def _run_block(block: Block, cwd: Path) -> None:
    env = _env(block)
    for command in block.mark("before"):
        done = _shell(shlex.split(command)[0], cwd, env)
        assert done.returncode == 0, f"{block.name}: before `{command}`: {done.stderr[-2000:]}"
    if block.kind == "python":
        script = cwd / f".block-{block.line}.py"
        script.write_text(_prepared(block), encoding="utf-8")
        done = subprocess.run([sys.executable, script.name], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert done.returncode == 0, f"{block.name}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    elif block.kind == "transcript":
        _run_transcript(block, cwd, env)
    else:
        _run_bash(block, cwd, env)


DOCUMENTS = [path for path in DOCS if any(block.path == path for block in RUN)]


@pytest.mark.slow
@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(path.relative_to(ROOT)) for path in DOCUMENTS])
def test_document_runs(path, tmp_path):
    """Every block of one document, in order, in one folder: a block may use what the blocks above it made. One
    test per document, so that test workers running side by side never split a document."""
    cwd = workspace(path, tmp_path)
    ran = [block for block in RUN if block.path == path and _skipped(block) is None]
    for block in ran:
        _run_block(block, cwd)
    if not ran:
        pytest.skip("; ".join(filter(None, (_skipped(b) for b in RUN if b.path == path))))


def test_the_tiny_variant_appends_where_it_should():
    assert _tiny("fedmomentum run --method flora") == f"fedmomentum run --method flora {TINY['run']}"
    assert _tiny("fedmomentum run --resume runs/x --rounds 6") == "fedmomentum run --resume runs/x --rounds 6"
    assert _tiny("OMP_NUM_THREADS=1 fedmomentum study --config a.toml &") == (
        f"OMP_NUM_THREADS=1 fedmomentum study --config a.toml {TINY['study']} &")
    assert _tiny("fedmomentum run --out runs/x      # a comment") == (
        f"fedmomentum run --out runs/x {TINY['run']}      # a comment")
    assert _tiny("fedmomentum methods") == "fedmomentum methods"
    assert shutil.which("bash")
