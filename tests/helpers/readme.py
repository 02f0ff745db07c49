"""README.md as a test suite, through Sybil (a maintained doctest-for-documents library).

Sybil finds the fenced blocks (```bash, ```console, ```python) and the directives in HTML
comments in front of them; this module says how each runs. Every block runs in order, in
one fresh git clone of this checkout with the suite's virtualenv as its `.venv` (what
`make venv` would have built), in a shell whose environment starts nearly empty (PATH of
the OS, a temporary HOME, LANG, a 120-column width) and then holds only what the README's
own blocks export or source: the environment and working directory one block leaves are
the next block's, as in one terminal. No MLFLOW_*, PREFECT_* or AWS_* variable of the
test process gets in.

Directives (an HTML comment right before a block, invisible on GitHub):

- ``<!-- skip: next "reason" -->`` (Sybil's own): not executable here, and why.
- ``<!-- readme-test: shrink KEY=VALUE ... -->``: the next block runs with these dotted
  params overrides added to each `python -m flows.pipeline` / `flows.sweep` command
  (after its own overrides, before its first option, which keeps ``--stages`` values),
  `make smoke` (as ``OVERRIDES=...``) and `dvc exp run` (as ``-S KEY=VALUE``). Sizes and
  epochs only, and for a pipeline command a trailing ``--stages ...`` that leaves out
  export (tested once per format in tests/test_export.py); a later override of the same
  key wins.
- ``<!-- readme-test: result -->``: the next block must end with the pipeline's result
  line (test accuracy, registered version, MLflow run) among its last ``RESULT_WITHIN``
  lines (DVC and Prefect print a few of their own after it; Prefect wraps it).
- ``<!-- readme-test: background ready="TEXT" -->``: the next block starts a server; it
  keeps running in the background once TEXT appears in its output, until
  ``<!-- readme-test: stop -->`` or the end of the document.

A block passes when it exits 0 and prints no line a user would read as a failure (see
``ALARMING``); a ```console block runs each ``$ `` command and passes when every line shown
under it appears in its output, in order (``...`` stands for any lines, and inside a line
for any text).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from sybil import Example, Region, Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer

BLOCK_TIMEOUT_S = 900  # the longest README block (a shrunk pipeline run) takes ~1-2 min
READY_TIMEOUT_S = 240  # a server's first answer (make serve-model loads TensorFlow)
OS_PATH = "/usr/local/bin:/usr/bin:/bin"
RESULT_WITHIN = 8  # lines from the end of a block's output (wrapped lines count as several)
RESULT_LINE = re.compile(r"test accuracy [\d.]+; registered \S+ version \d+ .*; MLflow: ")

# Lines that read as a failure (or a warning nobody can act on) on a run that succeeded.
ALARMING = re.compile(
    r"Traceback \(most recent call last\)|^E0000|\bE\d{4} .*\]|^\s*error\b|\berror:"
    r"|already exists\. Creating a new version|fully_quantize:|Lowering tensor list ops"
    r"|failed call to cuInit|SetuptoolsDeprecationWarning",
    re.MULTILINE | re.IGNORECASE,
)
PIPELINE_COMMAND = re.compile(r"^\s*python -m flows\.(pipeline|sweep)\b")
MAKE_SMOKE = re.compile(r"^\s*make smoke\b")
DVC_EXP_RUN = re.compile(r"^\s*dvc exp run\b")


@dataclass
class Shell:
    """One terminal session over a fresh clone: its environment and working directory
    carry from block to block."""

    root: Path
    env: dict[str, str]
    shrink: list[str] = field(default_factory=list)  # for the next block only
    expect_result: bool = False  # the next block ends with the pipeline's result line
    ready: str | None = None  # the next block is a background server, up once this shows
    servers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def fresh(cls, root: Path, home: Path) -> Shell:
        env = {"PATH": OS_PATH, "HOME": str(home), "LANG": "C.UTF-8", "PWD": str(root)}
        env["COLUMNS"] = "120"  # a terminal's width: tables (dvc exp show) are laid out for it
        return cls(root, env)

    def shrunk(self, source: str) -> str:
        """``source`` with the pending shrink overrides, which apply to this block only."""
        body, self.shrink = apply_shrink(source, self.shrink), []
        return body

    def script(self, source: str, state: Path) -> str:
        body = self.shrunk(source)
        return f"set -eo pipefail\ncd {shlex.quote(self.env['PWD'])}\n{body}\nenv -0 > {state}\n"

    def run(self, source: str, timeout: float = BLOCK_TIMEOUT_S) -> tuple[int, str]:
        with tempfile.TemporaryDirectory(prefix="readme-shell-") as scratch:
            state = Path(scratch) / "env"
            result = subprocess.run(
                ["bash", "-c", self.script(source, state)],
                env=self.env,
                cwd=self.env["PWD"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
            if result.returncode == 0 and state.is_file():
                self.env = read_env(state.read_bytes())
        return result.returncode, result.stdout

    def start(self, source: str, ready: str, log: Path) -> None:
        """Start a block that serves until stopped; return once ``ready`` is in its output."""
        with log.open("w") as out:
            process = subprocess.Popen(
                ["bash", "-c", f"cd {shlex.quote(self.env['PWD'])}\n{source}"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        self.servers.append(process)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while ready not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"server block did not print {ready!r}:\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Ctrl-C to every background block (its whole process group), as a user would."""
        for process in self.servers:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
        for process in self.servers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.servers = []


def read_env(dump: bytes) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in dump.decode().split("\0") if "=" in item)
    return {key: value for key, value in pairs if key not in ("_", "SHLVL", "OLDPWD")}


def logical_lines(source: str) -> list[str]:
    """Shell lines with backslash continuations joined (the unit overrides append to)."""
    lines, current = [], ""
    for line in source.splitlines():
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines + ([current] if current else [])


def apply_shrink(source: str, overrides: list[str]) -> str:
    """``source`` with the shrink overrides appended to each pipeline command (before a
    trailing comment)."""
    if not overrides:
        return source
    out = []
    for line in logical_lines(source):
        command, comment = re.match(r"(.*?)(\s+#.*)?$", line).groups()
        if PIPELINE_COMMAND.match(command):  # after the block's overrides, before options
            added = " ".join(shlex.quote(item) for item in overrides)
            option = re.search(r"\s--[a-z]", command)
            at = option.start() if option else len(command)
            command = f"{command[:at]} {added}{command[at:]}"
        elif MAKE_SMOKE.match(command):
            command += " OVERRIDES=" + shlex.quote(" ".join(overrides))
        elif DVC_EXP_RUN.match(command):
            command += "".join(f" -S {shlex.quote(item)}" for item in overrides)
        out.append(command + (comment or ""))
    return "\n".join(out)


def check_store(shell: Shell) -> None:
    """MLflow's own default store (./mlflow.db) must never appear: every command reaches
    the store params.yaml names."""
    stray = shell.root / "mlflow.db"
    assert not stray.exists(), f"{stray} was created: a command used MLflow's default store"


def check_result(output: str) -> None:
    """The result among the last lines, compared with line wrapping undone (Prefect's CLI
    wraps its log lines at the terminal width)."""
    last = output.strip().splitlines()[-RESULT_WITHIN:]
    assert RESULT_LINE.search(" ".join(" ".join(last).split())), (
        "the block does not end with the pipeline's result line; its last lines:\n"
        + "\n".join(last)
    )


def check_quiet(output: str) -> None:
    alarming = [m.group(0) for m in ALARMING.finditer(output)]
    lines = [line for line in output.splitlines() if ALARMING.search(line)]
    assert not alarming, "a successful block printed alarming lines:\n" + "\n".join(lines)


def shell_of(example: Example) -> Shell:
    return example.namespace["readme_shell"]


def run_block(shell: Shell, source: str) -> None:
    """Run ``source`` to its end; it must exit 0, say nothing alarming, touch no default
    store, and (when asked) end with the result line."""
    code, output = shell.run(source)
    assert code == 0, f"block exited {code}; its output ends:\n{output[-6000:]}"
    check_quiet(output)
    check_store(shell)
    if shell.expect_result:
        shell.expect_result = False
        check_result(output)


def evaluate_bash(example: Example) -> None:
    shell = shell_of(example)
    if shell.ready is None:
        run_block(shell, example.parsed)
        return
    ready, shell.ready = shell.ready, None
    log = Path(shell.env["HOME"]) / f"server-{len(shell.servers)}.log"  # outside the clone
    shell.start(shell.shrunk(example.parsed), ready, log)


def evaluate_python(example: Example) -> None:
    run_block(shell_of(example), f"python - <<'README_PY'\n{example.parsed}README_PY\n")


def console_steps(text: str) -> list[tuple[str, list[str]]]:
    """``$ command`` lines with the output lines shown under each."""
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def line_pattern(expected: str) -> re.Pattern:
    """``...`` is any text; a run of spaces any run of whitespace (table columns)."""
    parts = [r"\s+".join(map(re.escape, part.split())) for part in expected.split("...")]
    return re.compile(".*".join(parts))


def evaluate_console(example: Example) -> None:
    shell = shell_of(example)
    for command, expected in console_steps(example.parsed):
        _, output = shell.run(command)
        lines = output.splitlines()
        at = 0
        for want in (line for line in expected if line.strip() and line.strip() != "..."):
            pattern = line_pattern(want)
            found = next((i for i in range(at, len(lines)) if pattern.search(lines[i])), None)
            assert found is not None, (
                f"`{command}` did not print (in order) {want!r}; it printed:\n{output[-6000:]}"
            )
            at = found + 1


def evaluate_directive(example: Example) -> None:
    shell = shell_of(example)
    action, _, rest = example.parsed.partition(" ")
    if action == "shrink":
        shell.shrink = shlex.split(rest)
    elif action == "background":
        shell.ready = shlex.split(rest.removeprefix("ready="))[0]
    elif action == "result":
        shell.expect_result = True
    elif action == "stop":
        shell.stop()
    else:
        raise ValueError(f"unknown readme-test directive {action!r}")


class DirectiveParser:
    """``<!-- readme-test: ACTION ARGS -->`` in front of a block."""

    def __init__(self) -> None:
        self.lexer = DirectiveInHTMLCommentLexer(directive="readme-test")

    def __call__(self, document):
        for lexed in self.lexer(document):
            yield Region(
                lexed.start, lexed.end, lexed.lexemes["arguments"].strip(), evaluate_directive
            )


def readme_sybil() -> Sybil:
    return Sybil(
        parsers=[
            SkipParser(),
            DirectiveParser(),
            CodeBlockParser(language="bash", evaluator=evaluate_bash),
            CodeBlockParser(language="console", evaluator=evaluate_console),
            CodeBlockParser(language="python", evaluator=evaluate_python),
        ],
        path=str(Path(__file__).resolve().parents[2]),  # the repository root
        patterns=["README.md"],
        fixtures=["readme_shell"],
    )
