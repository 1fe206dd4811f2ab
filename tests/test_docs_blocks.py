"""Every fenced code block of README.md and docs/*.md runs as written.

Each block carries a marker: an HTML comment on the line just above its opening fence
(rendered Markdown shows neither). It says what this test does with the block.

=============================================  =========================================
marker                                         what the test does
=============================================  =========================================
``<!-- doc: run -->``                          Runs the block to the end, as in the
                                               reader's main terminal: a ``python``
                                               block as a script (``python FILE``), any
                                               other with ``bash -euo pipefail``. It
                                               must exit 0. Variables that a shell block
                                               exports are set for the blocks after it.
``<!-- doc: terminal [NAME] [until "T"] -->``  Starts the block (shell) in a terminal of
                                               its own: a new process group, the
                                               environment of a new terminal. Waits
                                               until its output shows ``T``; for
                                               ``dcp broker`` and ``dcp orchestrator``
                                               the default is ``listening on``. It runs
                                               until the document ends. Then it gets
                                               Ctrl-C (SIGINT) and must exit 0.
``<!-- doc: terminals -->``                    Each line of the block, in a terminal of
                                               its own, in order.
``<!-- doc: output [NAME] -->``                Each line of the block appears, in this
                                               order, in what terminal NAME printed
                                               (waited for). Without NAME, in what the
                                               ``run`` block just before printed.
                                               ``...`` in a line stands for any text.
``<!-- doc: transcript -->``                   Runs the ``$ COMMAND`` lines. Each must
                                               print exactly the lines after it
                                               (``...`` for any text).
``<!-- doc: file PATH [KIND] -->``             The block is the file PATH. A file of the
                                               repository must be equal to it; otherwise
                                               the block is written to PATH for the
                                               blocks after it. KIND (``spec``,
                                               ``policy``, ``broker`` or
                                               ``orchestrator``) loads it as a pipeline
                                               spec, an orchestrator's policy file or a
                                               daemon's config, which must succeed.
``<!-- doc: api-reference -->``                The API reference command.
                                               ``test_the_api_reference_builds`` runs
                                               its ``pdoc`` line.
``<!-- doc: not run: REASON -->``              Not run, for the reason given: it
                                               installs, takes minutes, needs other
                                               hosts...
``<!-- test-command -->``                      README's test command, which CI runs
                                               (``.ci/run``).
=============================================  =========================================

``test_every_block_is_accounted_for`` fails on a block without a marker. It also fails
on a ``python`` block that is not a valid script (a top-level ``await``...), even one
that is not run.

A document is followed top to bottom, in a fresh directory, as one reader would. The
directory holds the repository's ``examples/``. The venv's ``python`` and ``dcp`` come
first on PATH, as after ``. .venv/bin/activate``. Output is unbuffered, as in a
terminal. The documents give the fixed addresses of the defaults (``127.0.0.1:7400``,
``127.0.0.1:7300``...). The daemons here listen on ports that the OS picks, by this
rewriting rule:

* A terminal that runs ``dcp broker`` or ``dcp orchestrator`` with ``--listen
  127.0.0.1:N`` is started with ``--listen 127.0.0.1:0``. Once it says ``listening on
  127.0.0.1:P``, ``127.0.0.1:N`` stands for ``127.0.0.1:P`` in every block after it,
  expected output included. Suppose a terminal is started on an address that an earlier
  one holds. Then it replaces that one, which gets Ctrl-C first, as the reader would do.
* Some ``dcp`` commands talk to the orchestrator: ``deploy``, ``undeploy``,
  ``pipelines``, ``status``, and ``token`` without ``--secret-file``. Such a command
  without ``--orchestrator`` gets ``--orchestrator 127.0.0.1:7300``, its default. That
  address is then rewritten as above.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from dcp.config import BrokerConfig, OrchestratorConfig
from dcp.patterns import Policy
from dcp.spec import load_spec

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
#: Where ``python`` and ``dcp`` are: the venv running the tests.
BIN = Path(sys.executable).parent
#: What a fresh working directory holds of the repository, as links.
LINKED = ("examples",)

MARKER = re.compile(r"<!-- doc: (?P<spec>.*?) -->")
TEST_COMMAND = "<!-- test-command -->"
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^`\s]*)")
PYTHON = ("python", "py", "python3")
SHELL = ("", "sh", "bash", "shell", "console")
LOADERS: dict[str, Callable[[Path], object]] = {
    "spec": load_spec,
    "policy": Policy.load,
    "broker": BrokerConfig.from_sources,
    "orchestrator": OrchestratorConfig.from_sources,
}

ADDRESS = re.compile(r"\b127\.0\.0\.1:\d+\b")
LISTEN = re.compile(r"--listen[ =](127\.0\.0\.1:\d+)\b")
DAEMON = re.compile(r"\bdcp (?:broker|orchestrator)\b")
LISTENING = re.compile(r"listening on (127\.0\.0\.1:\d+)")
ASKS_ORCHESTRATOR = re.compile(r"\bdcp (deploy|undeploy|pipelines|status|token)\b")
DEFAULT_ORCHESTRATOR = "127.0.0.1:7300"
DAEMON_READY = "listening on"
#: Variables of the caller that would change what a block does.
CLEARED = ("DCP_", "NOTIFY_SOCKET", "PYTHONASYNCIODEBUG")
#: What bash sets by itself: not carried from one block to the next.
VOLATILE = ("_", "SHLVL", "PWD", "OLDPWD")

START_S = 20.0  # a terminal's wait for its ready text, and for expected output
RUN_S = 30.0  # one run block
STOP_S = 15.0  # a terminal's graceful stop


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Action:
    """What a marker says to do with a block."""

    kind: str  # run, terminal, terminals, output, transcript, file, api-reference, not-run, test-command
    name: str = ""  # terminal, output: the terminal's name
    until: str = ""  # terminal: its ready text
    path: str = ""  # file
    load: str = ""  # file: the loader's name
    reason: str = ""  # not-run


def parse_marker(spec: str) -> Action:
    """The action of ``<!-- doc: SPEC -->``; ValueError if it is none."""
    if spec in ("run", "terminals", "transcript", "api-reference"):
        return Action(spec)
    if match := re.fullmatch(r'terminal(?: (?P<name>[\w.-]+))?(?: until "(?P<until>[^"]+)")?', spec):
        return Action("terminal", name=match["name"] or "", until=match["until"] or "")
    if match := re.fullmatch(r"output(?: (?P<name>[\w.-]+))?", spec):
        return Action("output", name=match["name"] or "")
    if match := re.fullmatch(rf"file (?P<path>\S+)(?: (?P<load>{'|'.join(LOADERS)}))?", spec):
        return Action("file", path=match["path"], load=match["load"] or "")
    if match := re.fullmatch(r"not run: (?P<reason>.+)", spec):
        return Action("not-run", reason=match["reason"].strip())
    raise ValueError(f"unknown marker <!-- doc: {spec} -->")


@dataclass(frozen=True)
class Block:
    """A fenced block and the marker above it."""

    document: Path
    line: int  # of the opening fence, from 1
    lang: str
    text: str  # what is between the fences, ending with a newline
    marker: str | None  # the marker's spec, TEST_COMMAND, or None

    @property
    def where(self) -> str:
        return f"{shown(self.document)}:{self.line}"

    @property
    def action(self) -> Action:
        """Raises ValueError: no marker, or not one of the above."""
        if self.marker is None:
            raise ValueError("no marker: put <!-- doc: run --> (or another, see tests/test_docs_blocks.py) above it")
        if self.marker == TEST_COMMAND:
            return Action("test-command")
        return parse_marker(self.marker)


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def read_blocks(document: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order."""
    lines = document.read_text(encoding="utf-8").split("\n")
    blocks = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        end = i + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and set(lines[end].strip()) == {fence[0]}
        ):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{shown(document)}:{i + 1}: a fence that is never closed")
        body = "".join(line[indent:] + "\n" if line[:indent].isspace() else line + "\n" for line in lines[i + 1 : end])
        before = lines[i - 1].strip() if i else ""
        marker = TEST_COMMAND if before == TEST_COMMAND else (m["spec"] if (m := MARKER.fullmatch(before)) else None)
        blocks.append(Block(document, i + 1, opening["lang"].lower(), body, marker))
        i = end + 1
    return blocks


def problems(blocks: list[Block]) -> list[str]:
    """What is wrong with the blocks' markers, each message with the block's file and line."""
    found = []
    terminals: set[str] = set()
    previous: Action | None = None
    for block in blocks:
        try:
            action = block.action
        except ValueError as exc:
            found.append(f"{block.where}: {exc}")
            previous = None
            continue
        if block.lang in PYTHON:
            try:
                compile(block.text, block.where, "exec", dont_inherit=True)
            except SyntaxError as exc:
                found.append(f"{block.where}: this python block is not a valid script: {exc.msg} (line {exc.lineno})")
        if action.kind in ("terminal", "terminals", "transcript") and block.lang not in SHELL:
            found.append(f"{block.where}: a {action.kind} block must be shell, not {block.lang}")
        if action.kind == "run" and block.lang not in PYTHON + SHELL:
            found.append(f"{block.where}: a run block must be python or shell, not {block.lang}")
        if action.kind in ("terminal", "terminals"):
            commands = block.text.strip().split("\n") if action.kind == "terminals" else [block.text]
            for command in commands:
                if DAEMON.search(command) and not LISTEN.search(command):
                    found.append(f"{block.where}: a daemon started here needs --listen 127.0.0.1:PORT (the address the test maps)")
            terminals.add(action.name)
        if action.kind == "output":
            if action.name and action.name not in terminals:
                found.append(f"{block.where}: no terminal {action.name!r} is started before this output")
            if not action.name and (previous is None or previous.kind != "run"):
                found.append(f"{block.where}: an output without a terminal's name must follow a run block")
        if action.kind == "file" and (ROOT / action.path).is_file():
            if (ROOT / action.path).read_text(encoding="utf-8") != block.text:
                found.append(f"{block.where}: this block is not what {action.path} holds (copy the file into the block)")
        if action.kind == "not-run" and len(action.reason) < 10:
            found.append(f"{block.where}: say why the block is not run")
        previous = action
    return found


# --------------------------------------------------------------------------- following a document


def expected_lines(text: str) -> list[re.Pattern[str]]:
    """A pattern per non-blank line; ``...`` stands for any text, surrounding blanks are ignored."""
    return [re.compile(".*?".join(map(re.escape, line.strip().split("...")))) for line in text.split("\n") if line.strip()]


def first_missing(patterns: list[re.Pattern[str]], lines: list[str]) -> int | None:
    """The index of the first pattern not matched by ``lines`` in order, or None when all are."""
    want = 0
    for line in lines:
        if want < len(patterns) and patterns[want].fullmatch(line.strip()):
            want += 1
    return None if want == len(patterns) else want


def new_terminal_environment() -> dict[str, str]:
    """What a new terminal has, with the venv activated: none of the caller's dcp settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(CLEARED)}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(BIN.parent), PYTHONUNBUFFERED="1")
    return env


class Terminal:
    """A block running in a terminal of its own: a process group whose output is kept."""

    def __init__(self, where: str, command: str, cwd: Path, env: dict[str, str]) -> None:
        self.where = where
        self.command = command
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self.process = subprocess.Popen(
            ["bash", "-c", "set -euo pipefail\n" + command],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace", start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, found: Callable[[list[str]], T | None], what: str | Callable[[list[str]], str], timeout: float = START_S) -> T:
        """What ``found`` returns on the lines so far, once it is not None (each new line
        wakes it up). ``what`` says what was awaited, or makes that from the lines."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = found(self.lines)
                if result is not None:
                    return result
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    why = f"it exited ({self.process.wait()})" if self._ended else f"not within {timeout:.0f} s"
                    awaited = what(self.lines) if callable(what) else what
                    raise AssertionError(
                        f"{self.where}: waited for {awaited}, {why}.\n--- the terminal ran ---\n{self.command}"
                        f"--- its output ---\n" + "\n".join(self.lines)
                    )
                self._changed.wait(left)

    def stop(self) -> int | None:
        """Ctrl-C, as in a terminal: SIGINT to its process group. The exit status, or None
        if it had to be killed."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            status: int | None = self.process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            status = None
        self._reader.join(STOP_S)
        return status


class Reader:
    """One reader following a document in ``workdir``: the main terminal's environment,
    the terminals started, and the documented addresses mapped to the real ones."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        for name in LINKED:
            (workdir / name).symlink_to(ROOT / name, target_is_directory=True)
        (workdir / ".blocks").mkdir()
        self.env = new_terminal_environment()
        self.addresses: dict[str, str] = {}  # documented -> real
        self.terminals: list[Terminal] = []
        self.named: dict[str, Terminal] = {}
        self.holders: dict[str, Terminal] = {}  # documented listen address -> its terminal
        self.last_output: str | None = None

    # -- the rewriting rule

    def rewrite(self, text: str) -> str:
        return ADDRESS.sub(lambda m: self.addresses.get(m[0], m[0]), text)

    @staticmethod
    def with_orchestrator(command: str) -> str:
        """``--orchestrator 127.0.0.1:7300`` (the default) for a command that asks the
        orchestrator and does not say where it is."""
        lines = []
        for line in command.split("\n"):
            code = line.split(" #", 1)[0]
            match = ASKS_ORCHESTRATOR.search(code)
            if match and "--orchestrator" not in code and not (match[1] == "token" and "--secret-file" in code):
                line = f"{line[: match.end()]} --orchestrator {DEFAULT_ORCHESTRATOR}{line[match.end() :]}"
            lines.append(line)
        return "\n".join(lines)

    # -- the actions

    def follow(self, blocks: list[Block]) -> None:
        for block in blocks:
            action = block.action
            handler = getattr(self, "do_" + action.kind.replace("-", "_"))
            handler(block, action)

    def do_not_run(self, block: Block, action: Action) -> None:
        pass

    do_test_command = do_api_reference = do_not_run

    def do_run(self, block: Block, action: Action) -> None:
        if block.lang in PYTHON:
            script = self.workdir / ".blocks" / f"{block.document.stem}-{block.line}.py"
            script.write_text(self.rewrite(block.text), encoding="utf-8")
            argv = [sys.executable, str(script)]
            env_file = None
        else:
            env_file = self.workdir / ".blocks" / f"{block.document.stem}-{block.line}.env"
            script_text = self.rewrite(self.with_orchestrator(block.text))
            argv = ["bash", "-c", f"set -euo pipefail\n{script_text}\nenv -0 > {shlex.quote(str(env_file))}"]
        status, output = self.execute(argv, block.where)
        if status != 0:
            raise AssertionError(
                f"{block.where}: this {block.lang or 'shell'} block exited with {status}.\n--- as run ---\n"
                f"{self.rewrite(block.text)}--- its output ---\n{output}"
            )
        self.last_output = output
        if env_file is not None:
            pairs = (item.split("=", 1) for item in env_file.read_text(encoding="utf-8").split("\0") if "=" in item)
            self.env = {key: value for key, value in pairs if key not in VOLATILE}

    def execute(self, argv: list[str], where: str) -> tuple[int, str]:
        """Run ``argv`` in the main terminal; its status and output (stderr included)."""
        process = subprocess.Popen(
            argv, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=RUN_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            raise AssertionError(f"{where}: still running after {RUN_S:.0f} s; its output:\n{output}") from None
        return process.returncode, output

    def do_terminal(self, block: Block, action: Action) -> None:
        terminal = self.start(block.where, block.text, action.until)
        if action.name:
            self.named[action.name] = terminal

    def do_terminals(self, block: Block, action: Action) -> None:
        for offset, line in enumerate(block.text.split("\n"), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                self.start(f"{block.where} (line {offset} of the block)", line + "\n", "")

    def start(self, where: str, command: str, until: str) -> Terminal:
        command = self.with_orchestrator(command)
        listen = LISTEN.search(command) if DAEMON.search(command) else None
        documented = listen[1] if listen else None
        if documented is not None:
            holder = self.holders.pop(documented, None)
            if holder is not None:  # the reader stops the one there first
                self.stop(holder)
            self.addresses.pop(documented, None)
            command = command[: listen.start(1)] + "127.0.0.1:0" + command[listen.end(1) :]  # type: ignore[union-attr]
        command = self.rewrite(command)
        terminal = Terminal(where, command, self.workdir, new_terminal_environment())
        self.terminals.append(terminal)
        ready = until or (DAEMON_READY if documented is not None else "")
        if ready:
            terminal.wait_for(lambda lines: True if any(ready in line for line in lines) else None, repr(ready))
        if documented is not None:
            real = terminal.wait_for(
                lambda lines: next((m[1] for line in lines if (m := LISTENING.search(line))), None), "its listening line"
            )
            self.addresses[documented] = real
            self.holders[documented] = terminal
        return terminal

    def stop(self, terminal: Terminal) -> None:
        status = terminal.stop()
        self.terminals.remove(terminal)
        if status != 0:
            raise AssertionError(
                f"{terminal.where}: Ctrl-C {'did not stop it' if status is None else f'made it exit with {status}'}"
                f"\n--- its output ---\n{terminal.output()}"
            )

    def do_output(self, block: Block, action: Action) -> None:
        expected = [line.strip() for line in self.rewrite(block.text).split("\n") if line.strip()]
        patterns = expected_lines("\n".join(expected))

        def missing(lines: list[str]) -> str:
            index = first_missing(patterns, lines)
            return "" if index is None else expected[index]

        if action.name:
            self.named[action.name].wait_for(
                lambda lines: True if first_missing(patterns, lines) is None else None,
                lambda lines: f"a line like {missing(lines)!r} (the output shown at {block.where})",
            )
            return
        assert self.last_output is not None
        lines = self.last_output.split("\n")
        assert first_missing(patterns, lines) is None, (
            f"{block.where}: the run block before printed no line like {missing(lines)!r}; it printed:\n{self.last_output}"
        )

    def do_transcript(self, block: Block, action: Action) -> None:
        command: str | None = None
        expected: list[str] = []
        for line in [*block.text.split("\n"), "$ "]:
            if line.startswith("$ "):
                if command:
                    self.check_transcript(block, command, expected)
                command, expected = line[2:], []
            elif line.strip():
                expected.append(line)

    def check_transcript(self, block: Block, command: str, expected: list[str]) -> None:
        _, output = self.execute(["bash", "-c", self.rewrite(self.with_orchestrator(command))], block.where)
        lines = output.rstrip("\n").split("\n") if output.strip() else []
        patterns = expected_lines(self.rewrite("\n".join(expected)))
        matched = len(lines) == len(patterns) and all(p.fullmatch(line.strip()) for p, line in zip(patterns, lines))
        assert matched, f"{block.where}: $ {command}\nprinted:\n{output}\nnot what the block shows:\n" + "\n".join(expected)

    def do_file(self, block: Block, action: Action) -> None:
        path = ROOT / action.path
        if not path.is_file():
            path = self.workdir / action.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.rewrite(block.text), encoding="utf-8")
        if action.load:
            try:
                LOADERS[action.load](path)
            except Exception as exc:
                raise AssertionError(f"{block.where}: {action.path} does not load as a {action.load}: {exc}") from exc

    def close(self) -> None:
        """Ctrl-C every terminal still running, the last started first; each must exit 0."""
        failures = []
        for terminal in reversed(list(self.terminals)):
            try:
                self.stop(terminal)
            except AssertionError as exc:
                failures.append(str(exc))
        assert not failures, "\n\n".join(failures)


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[Reader]:
    reader = Reader(tmp_path)
    try:
        yield reader
    finally:
        reader.close()


def follow(reader: Reader, document: Path) -> None:
    """Follow ``document``; its terminals are stopped (each must exit 0) even when a block fails."""
    try:
        reader.follow(read_blocks(document))
    except BaseException:
        for terminal in reversed(list(reader.terminals)):
            terminal.stop()
        reader.terminals.clear()
        raise


# --------------------------------------------------------------------------- the documents


def runs_something(document: Path) -> bool:
    runnable = ("run", "terminal", "terminals", "transcript", "file")
    try:
        return any(block.action.kind in runnable for block in read_blocks(document))
    except ValueError:
        return True  # a bad marker: let the test say so


@pytest.mark.parametrize("document", DOCUMENTS, ids=shown)
def test_every_block_is_accounted_for(document: Path) -> None:
    assert problems(read_blocks(document)) == []


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if runs_something(d)], ids=shown)
def test_the_blocks_run_as_written(document: Path, reader: Reader) -> None:
    makes_certificates = any(
        block.marker == "run" and re.search(r"^openssl ", block.text, re.M) for block in read_blocks(document)
    )
    if makes_certificates and shutil.which("openssl") is None:  # as tests/throwaway_ca.py does
        pytest.skip(f"the openssl command is not installed: {shown(document)} makes certificates with it")
    follow(reader, document)


def test_every_python_block_of_the_readme_and_the_quickstart_runs() -> None:
    """The snippets a newcomer pastes first: none of them is left out as "not run"."""
    for document in (ROOT / "README.md", ROOT / "docs" / "quickstart.md"):
        python = [block for block in read_blocks(document) if block.lang in PYTHON]
        assert python, f"{shown(document)} has no python block"
        assert [block.where for block in python if block.action.kind not in ("run", "file")] == []


def test_the_readme_links_the_quickstart_and_the_guides() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/quickstart.md)" in readme
    for guide in ("brokers.md", "agents.md", "specs.md", "security.md", "benchmarks.md"):
        assert (ROOT / "docs" / guide).is_file(), guide
        assert f"(docs/{guide})" in readme, f"README.md does not link docs/{guide}"


# --------------------------------------------------------------------------- the harness itself


def write(tmp_path: Path, text: str) -> Path:
    document = tmp_path / "doc.md"
    document.write_text(text, encoding="utf-8")
    return document


def test_a_block_without_a_marker_or_not_a_script_is_reported_with_its_line(tmp_path: Path) -> None:
    document = write(tmp_path, (
        "# title\n\n```python\nprint(1)\n```\n\n<!-- doc: not run: it is only an example -->\n"
        "```python\nawait main()\n```\n\n<!-- doc: not run: x -->\n```\nls\n```\n"
        "<!-- doc: frobnicate -->\n```toml\na = 1\n```\n"
    ))
    found = problems(read_blocks(document))
    assert [message.split(":", 2)[1] for message in found] == ["3", "8", "13", "17"]
    assert "no marker" in found[0] and "not a valid script" in found[1] and "say why" in found[2] and "unknown marker" in found[3]


def test_a_failing_block_fails_with_its_file_and_line(tmp_path: Path, reader: Reader) -> None:
    document = write(tmp_path, "<!-- doc: run -->\n```python\nprint('fine')\n```\n\n<!-- doc: run -->\n```python\nraise SystemExit(3)\n```\n")
    with pytest.raises(AssertionError, match=r"doc\.md:7: this python block exited with 3"):
        follow(reader, document)


def test_shell_blocks_share_the_exports_and_output_is_checked(tmp_path: Path, reader: Reader) -> None:
    document = write(tmp_path, (
        "<!-- doc: run -->\n```\nexport GREETING=hello\n```\n"
        "<!-- doc: run -->\n```\necho \"$GREETING, world\"\n```\n<!-- doc: output -->\n```\n..., world\n```\n"
        "<!-- doc: run -->\n```\necho nothing\n```\n<!-- doc: output -->\n```\nsomething\n```\n"
    ))
    with pytest.raises(AssertionError, match=r"doc\.md:18: the run block before printed no line like 'something'"):
        follow(reader, document)


def test_a_daemon_gets_a_port_of_the_os_and_its_address_is_rewritten(tmp_path: Path, reader: Reader) -> None:
    document = write(tmp_path, (
        "<!-- doc: terminal b0 -->\n```\ndcp broker --listen 127.0.0.1:7400 --insecure --name b0\n```\n"
        "<!-- doc: run -->\n```\ndcp stats 127.0.0.1:7400\n```\n<!-- doc: output -->\n```\nbroker 127.0.0.1:7400 ...\n```\n"
        "<!-- doc: transcript -->\n```\n$ echo 127.0.0.1:7400 127.0.0.1:7399\n127.0.0.1:7400 127.0.0.1:7399\n```\n"
    ))
    follow(reader, document)
    [real] = reader.addresses.values()
    assert list(reader.addresses) == ["127.0.0.1:7400"] and real != "127.0.0.1:7400" and real.startswith("127.0.0.1:")
    assert Reader.with_orchestrator("dcp deploy x.toml  # dcp status") == "dcp deploy --orchestrator 127.0.0.1:7300 x.toml  # dcp status"
    assert Reader.with_orchestrator("T=$(dcp token a --secret-file s)") == "T=$(dcp token a --secret-file s)"


def test_a_terminal_whose_output_never_shows_fails_naming_the_block(tmp_path: Path, reader: Reader) -> None:
    document = write(tmp_path, "<!-- doc: terminal t until \"ready\" -->\n```\necho starting; exit 4\n```\n")
    with pytest.raises(AssertionError, match=r"doc\.md:2: waited for 'ready', it exited \(4\)"):
        follow(reader, document)


# --------------------------------------------------------------------------- the API reference

#: The modules of the API reference (README.md, "API reference").
API_MODULES = ("dcp", "dcp.client", "dcp.agent", "dcp.storage", "dcp.functions", "dcp.routing", "dcp.topology", "dcp.errors")


def docstrings(module_name: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of a module, its public members, and their methods:
    their own docstrings, as pdoc shows them (none inherited)."""

    def own(obj: object) -> str:
        return inspect.cleandoc(getattr(obj, "__doc__", None) or "")

    module = importlib.import_module(module_name)
    yield module_name, own(module)
    for name in getattr(module, "__all__", ()):
        member = getattr(module, name)
        if getattr(member, "__module__", module_name) != module_name or not callable(member):
            continue
        yield f"{module_name}.{name}", own(member)
        if inspect.isclass(member):
            for attribute, value in vars(member).items():
                if not attribute.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                    yield f"{module_name}.{name}.{attribute}", own(value)


def test_the_api_docstrings_have_no_rest_literal_markers() -> None:
    """pdoc renders docstrings as Markdown, where reST's ``::`` literal marker stays as
    it is: examples use ``.. code-block:: LANGUAGE``, which both render as code. Runs
    without pdoc."""
    found = [
        f"{name}: {line.strip()!r}"
        for module_name in API_MODULES
        for name, doc in docstrings(module_name)
        for line in doc.split("\n")
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".. ")
    ]
    assert found == []


def test_the_api_reference_builds(tmp_path: Path) -> None:
    """The README's pdoc command renders the public API, with no docstring left in
    reStructuredText that Markdown shows as it is."""
    [block] = [b for b in read_blocks(ROOT / "README.md") if b.marker == "api-reference"]
    [command] = [line for line in block.text.split("\n") if line.startswith("pdoc ")]
    assert shlex.split(command)[-len(API_MODULES):] == list(API_MODULES), "the modules of the command are API_MODULES"
    if not (BIN / "pdoc").exists():
        pytest.skip("pdoc is not installed (pip install -e '.[dev]'): the API reference is not built")
    argv = shlex.split(command)
    done = subprocess.run([str(BIN / "pdoc"), *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = tmp_path / argv[argv.index("-o") + 1]
    pages = {path.relative_to(out).as_posix(): path.read_text(encoding="utf-8") for path in out.rglob("*.html")}
    for page in ("dcp.html", "dcp/client.html", "dcp/agent.html", "dcp/storage.html", "dcp/routing.html",
                 "dcp/topology.html", "dcp/errors.html"):
        assert page in pages, f"{page} not rendered: {sorted(pages)}"
    for name in ("connect", "Connection", "DataAgent", "StorageAgent", "DcpError", "ConnectionClosed", "RoutingError"):
        assert f'id="{name}"' in pages["dcp.html"], f"dcp.html does not document {name}"
    leftovers = {page: text.count("<p>::</p>") for page, text in pages.items() if "<p>::</p>" in text}
    assert not leftovers, f"reST '::' paragraphs rendered as they are: {leftovers}"
