"""Every ```python and ```bash block of README.md, run as written on a tiny checkpoint.

The blocks run in README order, in a temporary folder whose `weights/v1-5-pruned-emaonly.safetensors` is a
tiny random-weight checkpoint in the real key layout (tests/synthetic.py), with this checkout's `sd15` and
`server` on the path. Nothing may download: the model URL points at a closed port. The rules, per block:

python  All python blocks run in one interpreter, in order, as if pasted into one session (a block may use
        the names an earlier block defined). A block that talks to `127.0.0.1:<port>` (or `localhost`) needs
        a server started by an earlier bash block; the port is replaced by that server's.
bash    Continuation lines are joined, comments dropped, each line split into commands at `&&` and `;`
        (a failed command skips the rest of its block), and each command goes by its first words:
        - `pip install ...`: not run (the test environment is installed already). It must be one of
          .ci/run's installs (written there `python3 -m pip install -q`), or the project with fewer extras
          (`pip install -e .`), or only packages of pyproject.toml's `test` extra (e.g. `requests`).
        - `python -m pytest ...`: not run (it would recurse). Its `-m` expression may use only markers
          declared in pyproject.toml, and a line that installs and tests must be .ci/run's test command.
        - `sd15-server ...` / `python -m server ...`: started in the background on a free port (`--port`
          replaced, `--listen` / `--server-name` dropped), ready when it answers HTTP, stopped when the next
          server starts or after the last block.
        - `sd15 ...` / `python -m sd15 ...`: run; it must exit with 0.
        - `curl ...` with a `127.0.0.1:<port>` URL: run against the live server (port replaced); exit 0.
        - `NAME=value` before a command sets its environment (the download URL stays the closed port).
        - anything else, and pipes, redirections or `$VARIABLES`: an error (add a rule here, or mark the
          block).
A block that cannot run here (a GPU-only line, a download, a real-weights benchmark) is preceded in README.md
by `<!-- not-run: the reason -->`; it is reported as skipped with that reason.
"""
from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import traceback
import urllib.error
import urllib.request

import pytest

import synthetic
from sd15.unet.unet import UNetConfig
from sd15.vae.vae import VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CI = os.path.join(ROOT, ".ci", "run")
CKPT_NAME = "v1-5-pruned-emaonly.safetensors"
DEFAULT_PORT = 7860  # the server's (and A1111's) default
TIMEOUT = 900  # seconds for one command or python block: a bound for a hang, not an expectation
LOCAL_URL = re.compile(r"(?:127\.0\.0\.1|localhost):(\d+)")
SAFETY_ENV = {"SD15_MODEL_URL": "http://127.0.0.1:9/no-downloads-in-tests", "HF_HUB_OFFLINE": "1"}

# Smaller than UNET_TINY / VAE_TINY (whose attention over 64x64 latents costs seconds per step): the README's
# commands run at their own sizes (512x512, 20 steps) in well under a second per step.
UNET_README = UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(2,),
                         context_dim=64)
VAE_README = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)

# ------------------------------------------------------------------------------------------------
# Reading README.md, .ci/run and pyproject.toml
# ------------------------------------------------------------------------------------------------

FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(.*?)\s*-->\s*$")
LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}


def readme_blocks(text: str) -> list[dict]:
    """The fenced python / bash blocks: {"lang", "line" (1-based, first code line), "code", "not_run"}."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        i += 1
        if lang not in LANGS:
            continue
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker = NOT_RUN.match(lines[prev]) if prev >= 0 else None
        blocks.append({"lang": LANGS[lang], "line": start + 2, "code": "\n".join(body) + "\n",
                       "not_run": marker.group(1) if marker else None})
    return blocks


class ShellSyntax(ValueError):
    pass


def shell_lines(code: str) -> list[list[list[str]]]:
    """A bash block as lines of commands (argv lists): continuations joined, comments dropped, split at `&&`
    and `;`. Anything the rules do not cover (pipes, redirections, subshells, variables) raises ShellSyntax."""
    out = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        cmds, cmd = [], []
        for tok in lex:
            if tok in ("&&", ";"):
                cmds, cmd = cmds + [cmd] if cmd else cmds, []
            elif set(tok) <= set("();<>|&") or "$" in tok or "`" in tok:
                raise ShellSyntax(f"`{tok}` in `{line.strip()}`: no rule runs that")
            else:
                cmd.append(tok)
        cmds += [cmd] if cmd else []
        if cmds:
            out.append(cmds)
    return out


def normalize(argv: list[str]) -> list[str]:
    """`python3 -m pip install -q X` and `pip install X` are the same install; `python3` is `python`."""
    argv = list(argv)
    if argv[:3] in (["python3", "-m", "pip"], ["python", "-m", "pip"]):
        argv = ["pip"] + argv[3:]
    if argv and argv[0] == "python3":
        argv[0] = "python"
    if argv[:2] == ["pip", "install"]:
        argv = [a for a in argv if a not in ("-q", "--quiet")]
    return argv


def ci_test_line() -> list[list[str]]:
    """The line of .ci/run that runs pytest (the README's test command), normalized."""
    with open(CI) as f:
        text = "".join(line for line in f if "pytest" in line.split("#")[0])
    lines = [cmds for cmds in shell_lines(text) if any(is_pytest(c) for c in cmds)]
    assert len(lines) == 1, f".ci/run should run pytest on exactly one line, found {len(lines)}"
    return [normalize(c) for c in lines[0]]


def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def is_pip(argv):
    return normalize(argv)[:2] == ["pip", "install"]


def is_pytest(argv):
    argv = normalize(argv)
    return argv[:1] == ["pytest"] or argv[:3] == ["python", "-m", "pytest"]


def is_server(argv):
    return argv[:1] == ["sd15-server"] or normalize(argv)[:3] == ["python", "-m", "server"]


def is_cli(argv):
    return argv[:1] == ["sd15"] or normalize(argv)[:3] == ["python", "-m", "sd15"]


def _requirement_name(req: str) -> str:
    return re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0].lower().replace("_", "-")


def check_pip(argv: list[str]) -> None:
    argv = normalize(argv)
    ci = [c for c in ci_test_line() if is_pip(c)]
    if argv in ci:
        return
    if "." in argv and any(argv == [re.sub(r"^\.\[[^\]]*\]$", ".", a) for a in c] for c in ci):
        return  # the project without the extras .ci/run installs it with
    test_extra = {_requirement_name(r) for r in pyproject()["project"]["optional-dependencies"]["test"]}
    packages = argv[2:]
    if packages and all(not p.startswith("-") and p.lower().replace("_", "-") in test_extra for p in packages):
        return
    raise AssertionError(f"`{shlex.join(argv)}` is none of .ci/run's installs {[shlex.join(c) for c in ci]}, "
                         f"nor the project, nor packages of the test extra")


def check_pytest_line(cmds: list[list[str]]) -> None:
    if any(is_pip(c) for c in cmds):
        assert [normalize(c) for c in cmds] == ci_test_line(), \
            f"the README's test command differs from .ci/run's: {' && '.join(map(shlex.join, cmds))}"
    markers = {m.split(":")[0].strip() for m in pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
    for c in filter(is_pytest, cmds):
        args = c[c.index("pytest") + 1:]
        for flag, value in zip(args, args[1:]):
            if flag == "-m":
                unknown = set(re.findall(r"\w+", value)) - markers - {"and", "or", "not"}
                assert not unknown, f"`{shlex.join(c)}`: no such pytest marker {sorted(unknown)}"


# ------------------------------------------------------------------------------------------------
# Running blocks
# ------------------------------------------------------------------------------------------------

SESSION = r"""
import json, os, sys, traceback
ctl = os.fdopen(os.dup(1), "w")  # answers go here; what the blocks print goes to the log (stderr)
os.dup2(2, 1)
sys.stdout = sys.stderr
ns = {"__name__": "__main__"}
for msg in map(json.loads, sys.stdin):
    print(f"----- README.md block at line {msg['line']} -----", flush=True)
    try:
        exec(compile("\n" * (msg["line"] - 1) + msg["code"], "README.md", "exec"), ns)
        answer = {"ok": True}
    except BaseException as e:
        answer = {"ok": False, "error": "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))}
    sys.stdout.flush()
    ctl.write(json.dumps(answer) + "\n")
    ctl.flush()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: str, start: int = 0, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        f.seek(start)
        text = f.read()
    return text[-n:]


class Runner:
    """Runs the blocks in order in `cwd`; keeps the python session and the live server between blocks."""

    def __init__(self, cwd: str):
        self.cwd, self.session, self.server, self.port, self.written_port = cwd, None, None, None, None
        path = os.environ.get("PYTHONPATH")
        self.env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""), PYTHONUNBUFFERED="1",
                        **SAFETY_ENV)
        self.log = os.path.join(cwd, "..", "readme-output.log")
        open(self.log, "w").close()

    def _argv(self, argv: list[str]) -> list[str]:
        argv = normalize(argv)
        if argv[0] == "sd15":
            return [sys.executable, "-m", "sd15"] + argv[1:]
        if argv[0] == "sd15-server":
            return [sys.executable, "-m", "server"] + argv[1:]
        return [sys.executable] + argv[1:] if argv[0] == "python" else argv

    # bash

    def bash(self, code: str) -> None:
        for cmds in shell_lines(code):
            if any(map(is_pytest, cmds)):
                check_pytest_line(cmds)
            for argv in cmds:
                env = {}
                while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):  # `NAME=value command ...`
                    name, value = argv[0].split("=", 1)
                    env[name], argv = value, argv[1:]
                env = {k: v for k, v in env.items() if k not in SAFETY_ENV}  # no download, whatever is written
                if is_pip(argv):
                    check_pip(argv)
                elif is_pytest(argv):
                    pass  # checked above; running it would recurse
                elif is_server(argv):
                    self.start_server(argv, env)
                elif is_cli(argv):
                    self.run_command(argv, env)
                elif argv[0] == "curl" and any(LOCAL_URL.search(a) for a in argv):
                    self.run_command([self.to_live_server(a) for a in argv], env)
                else:
                    raise AssertionError(f"no rule runs `{shlex.join(argv)}` (add one to tests/test_readme.py, "
                                         f"or mark the block <!-- not-run: reason -->)")

    def run_command(self, argv: list[str], env: dict) -> None:
        start = os.path.getsize(self.log)
        with open(self.log, "a") as log:
            log.write(f"----- $ {shlex.join(argv)}\n")
            log.flush()
            rc = subprocess.run(self._argv(argv), cwd=self.cwd, env={**self.env, **env}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, timeout=TIMEOUT).returncode
        assert rc == 0, f"`{shlex.join(argv)}` exited with {rc}:\n{tail(self.log, start)}"

    def start_server(self, argv: list[str], env: dict) -> None:
        self.stop_server()
        args, written, i = [], DEFAULT_PORT, 0
        argv = self._argv(argv)
        while i < len(argv):
            if argv[i] == "--port":
                written, i = int(argv[i + 1]), i + 2
            elif argv[i].startswith("--port="):
                written, i = int(argv[i].split("=", 1)[1]), i + 1
            elif argv[i] == "--listen":
                i += 1
            elif argv[i] == "--server-name":
                i += 2
            else:
                args, i = args + [argv[i]], i + 1
        self.port, self.written_port = free_port(), written
        start = os.path.getsize(self.log)
        with open(self.log, "a") as log:
            log.write(f"----- $ {shlex.join(args)} --port {self.port} &\n")
            log.flush()
            self.server = subprocess.Popen(args + ["--port", str(self.port)], cwd=self.cwd, env={**self.env, **env},
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise AssertionError(f"the server exited with {self.server.returncode}:\n{tail(self.log, start)}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5).close()
                return
            except urllib.error.HTTPError:  # any HTTP answer (401 with --api-auth, 404) means it is up
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"the server did not answer within {TIMEOUT} s:\n{tail(self.log, start)}")

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None

    # python

    def to_live_server(self, text: str) -> str:
        """`text` with the written port of the last server's URLs replaced by its real one."""
        if not LOCAL_URL.search(text):
            return text
        assert self.server is not None and self.server.poll() is None, \
            "this talks to a server, but no bash block before it started one"
        return re.sub(rf"(127\.0\.0\.1|localhost):{self.written_port}\b", rf"\g<1>:{self.port}", text)

    def python(self, code: str, line: int) -> None:
        code = self.to_live_server(code)
        if self.session is None:
            log = open(self.log, "a")
            self.session = subprocess.Popen([sys.executable, "-c", SESSION], cwd=self.cwd, env=self.env, text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
            log.close()
        start = os.path.getsize(self.log)
        self.session.stdin.write(json.dumps({"code": code, "line": line}) + "\n")
        self.session.stdin.flush()
        ready, _, _ = select.select([self.session.stdout], [], [], TIMEOUT)
        answer = self.session.stdout.readline() if ready else ""
        if not answer:
            self.stop_session()
            raise AssertionError(f"the python session died or took over {TIMEOUT} s:\n{tail(self.log, start)}")
        answer = json.loads(answer)
        assert answer["ok"], f"{answer['error']}\n(output)\n{tail(self.log, start, 1500)}"

    def stop_session(self) -> None:
        if self.session is not None:
            self.session.kill()
            self.session.wait()
            self.session = None

    def run(self, block: dict) -> tuple[str, str]:
        if block["not_run"] is not None:
            return "skipped", block["not_run"]
        try:
            if block["lang"] == "bash":
                self.bash(block["code"])
            else:
                self.python(block["code"], block["line"])
        except Exception as e:  # noqa: BLE001 - reported per block below
            text = str(e) if isinstance(e, (AssertionError, ShellSyntax)) else traceback.format_exc()
            return "failed", text
        return "passed", ""


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

with open(README) as f:
    BLOCKS = readme_blocks(f.read())


@pytest.fixture(scope="module")
def readme_results(tmp_path_factory):
    """Runs every block once, in order; the tests below report them one by one."""
    cwd = tmp_path_factory.mktemp("readme") / "run"
    (cwd / "weights").mkdir(parents=True)
    synthetic.write_tiny_checkpoint(str(cwd / "weights" / CKPT_NAME), unet=UNET_README, vae=VAE_README)
    runner = Runner(str(cwd))
    try:
        results = {}
        for b in BLOCKS:
            t0 = time.monotonic()
            results[b["line"]] = runner.run(b)
            print(f"README.md:{b['line']} {b['lang']}: {results[b['line']][0]} in {time.monotonic() - t0:.1f} s")
        return results
    finally:
        runner.stop_server()
        runner.stop_session()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b['line']}-{b['lang']}" for b in BLOCKS])
def test_readme_block(block, readme_results):
    status, text = readme_results[block["line"]]
    if status == "skipped":
        pytest.skip(f"README.md:{block['line']} marked not-run: {text}")
    assert status == "passed", f"README.md:{block['line']} ({block['lang']} block) fails:\n{text}"


def test_readme_has_blocks():
    assert any(b["lang"] == "python" for b in BLOCKS) and any(b["lang"] == "bash" for b in BLOCKS)


# The harness itself: each rule must be able to fail.


def test_shell_lines():
    code = 'pip install x && sd15 txt2img --prompt "a (red:1.2) fox" \\\n  --seed 1  # comment\nsd15-server --port 9\n'
    assert shell_lines(code) == [[["pip", "install", "x"], ["sd15", "txt2img", "--prompt", "a (red:1.2) fox",
                                                             "--seed", "1"]], [["sd15-server", "--port", "9"]]]
    for bad in ("sd15 txt2img > log", "cat x | sd15", "sd15 --ckpt $HOME/x", "(cd x)"):
        with pytest.raises(ShellSyntax):
            shell_lines(bad)


def test_readme_blocks_and_not_run_marker():
    text = ("# t\n```bash\nsd15 x\n```\n<!-- not-run: needs CUDA -->\n\n```python\nimport torch\n```\n"
            "```text\nignored\n```\n  ```py\n  a = 1\n  ```\n")
    blocks = readme_blocks(text)
    assert [(b["lang"], b["line"], b["code"], b["not_run"]) for b in blocks] == [
        ("bash", 3, "sd15 x\n", None), ("python", 8, "import torch\n", "needs CUDA"), ("python", 14, "a = 1\n", None)]


def test_pip_and_pytest_rules():
    ci = ci_test_line()
    check_pip(next(c for c in ci if is_pip(c)))  # .ci/run's own install
    check_pip(["pip", "install", "-e", "."])
    check_pip(["pip", "install", "requests"])
    for bad in (["pip", "install", "torch"], ["pip", "install", "numpy==1.0"], ["pip", "install", "-e", ".[gpu]", "x"]):
        with pytest.raises(AssertionError):
            check_pip(bad)
    check_pytest_line(ci)
    check_pytest_line([["python", "-m", "pytest", "-q", "-m", "not fullsize and not compile"]])
    with pytest.raises(AssertionError):
        check_pytest_line([["python", "-m", "pytest", "-m", "not fulsize"]])
    with pytest.raises(AssertionError):
        check_pytest_line(ci[:-1] + [ci[-1] + ["-x"]])


def test_runner_rules(tmp_path):
    """Unknown commands and server talk without a server fail; python blocks share one session and report
    README line numbers."""
    (tmp_path / "run").mkdir()
    runner = Runner(str(tmp_path / "run"))
    try:
        assert runner.run({"lang": "bash", "code": "rm -rf weights\n", "not_run": None})[0] == "failed"
        status, text = runner.run({"lang": "bash", "code": "curl http://127.0.0.1:7860/sdapi/v1/samplers\n",
                                   "not_run": None})
        assert status == "failed" and "no bash block before it started one" in text
        assert runner.run({"lang": "python", "code": "x = 2\n", "line": 10, "not_run": None}) == ("passed", "")
        assert runner.run({"lang": "python", "code": "assert x == 2\n", "line": 20, "not_run": None}) == ("passed", "")
        status, text = runner.run({"lang": "python", "code": "y = 1\nz = x + w\n", "line": 30, "not_run": None})
        assert status == "failed" and 'File "README.md", line 31' in text and "NameError" in text
        assert runner.run({"lang": "bash", "code": "rm x\n", "not_run": "why"}) == ("skipped", "why")
    finally:
        runner.stop_session()
