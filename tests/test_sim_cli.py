"""The simulator as a new user meets it: what it needs installed, how much memory it takes, what
it prints, what it says about a bad trace, and what a Ctrl-C leaves behind (nothing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmcache.config import GIB
from sim.budget import MAX_BLOCKS, BudgetError, num_blocks
from sim.leftovers import DEV_SHM, created_by
from test_sim import ROOT, run_sim

# What `python -m sim` reported before the human summary came; tools read these from --report.
REPORT_KEYS = {"requests", "prompt_tokens", "hit_tokens", "hit_rate", "local_hit_tokens", "stored_chunks",
               "retrieved_chunks", "bytes_stored", "bytes_retrieved", "mismatched_bytes", "evictions",
               "truncated_requests", "steps", "max_batch", "lookup_p50_ms", "lookup_p99_ms", "store_gbps",
               "retrieve_gbps", "wall_seconds", "hit_tokens_by_tier", "memcpy_gbps"}
SMALL = ["synth", "repeat", "--requests", "4", "--prompt-tokens", "1024", "--sequential"]
# 4 layers x 4 heads x (K and V) x 64 x float16 = 4 KiB a token: 1 MiB chunks, 64 KiB blocks
MIB_CHUNKS = ["--layers", "4", "--kv-heads", "4", "--head-size", "64", "--dtype", "float16"]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_without_torch_it_says_what_to_install_in_one_line() -> None:
    out = run_python("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'sim'; "
                     "runpy.run_module('sim', run_name='__main__', alter_sys=True)", "synth", "repeat")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["python -m sim needs torch, which the base install does not bring: "
                                               "pip install -e '.[sim]'"]


# --- the memory budget ------------------------------------------------------------------------

# Runs the CLI with the server and the engines replaced by a failure, so that a refusal proves it
# came before either started.
NOTHING_STARTS = """
import runpy, sys
import lmcache.server.process, sim.engine
def started(*_, **__):
    sys.exit("STARTED: the run was not refused before it began")
lmcache.server.process.ServerProcess.start = started
sim.engine.SimEngine.__init__ = started
sys.argv[0] = "sim"
runpy.run_module("sim", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(("args", "option", "says"), [
    (["--model-shape", "llama-8b", "--num-blocks", "8192", "--memory-gb", "1"], "--num-blocks", "need 16.0 GiB of KV"),
    (["--model-shape", "llama-8b", "--memory-gb", "0.01"], "--memory-gb", "holds 5 blocks of llama-8b"),
    (["--memory-gb", "1000000"], "--memory-gb", "of memory is available now"),
])
def test_a_run_that_does_not_fit_the_budget_is_refused_before_anything_starts(args: list[str], option: str,
                                                                                  says: str) -> None:
    out = run_python(NOTHING_STARTS, *SMALL, *args)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"'{option}'" in errors[0] and says in errors[0], out.stderr
    assert "STARTED" not in out.stderr and "Traceback" not in out.stderr


def test_blocks_are_sized_from_the_budget() -> None:
    block = 2 << 20  # llama-8b
    assert num_blocks(1 * GIB, block, 1, None, 18, "llama-8b") == 512
    assert num_blocks(1 * GIB, block, 4, None, 18, "llama-8b") == 128  # the budget is for every rank together
    assert num_blocks(100 * GIB, 256, 1, None, 18, "tiny") == MAX_BLOCKS  # a tiny model does not take it all
    assert num_blocks(1 * GIB, block, 1, 100, 18, "llama-8b") == 100
    with pytest.raises(BudgetError, match="more than the 1.0 GiB budget"):
        num_blocks(1 * GIB, block, 1, 513, 18, "llama-8b")


def test_a_run_sized_by_the_budget_plays_byte_exact_and_says_so(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, *SMALL, *MIB_CHUNKS, "--memory-gb", "0.01")
    assert code == 0, output
    assert report["num_blocks"] == int(0.01 * GIB) // (64 << 10) == 163
    assert report["mismatched_bytes"] == 0 and report["hit_tokens"] == 2 * 3 * 256
    assert "163 KV blocks a rank: 10.2 MiB of KV in all (budget 10.2 MiB" in output
    assert "per-chunk overhead" not in output  # 1 MiB chunks measure bandwidth


# --- the human summary ------------------------------------------------------------------------

def test_the_summary_gives_units_the_model_and_a_warning_for_small_chunks(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, *SMALL)
    assert code == 0, output
    assert REPORT_KEYS <= report.keys()  # the JSON is as it was, plus the model and chunk
    assert (report["model_shape"], report["chunk_bytes"], report["interrupted"]) == ("tiny", 4096, False)
    assert "tiny: 1 layer, 1 KV head, head size 4, float16: 16 B of KV per token per rank" in output
    assert "256 tokens = 4.0 KiB per rank" in output
    assert f"{report['hit_rate']:.1%}" in output and "of prompt tokens loaded from the server" in output
    for unit in (" GB/s ", " ms,", " ms ", "KiB"):
        assert unit in output
    warning = [line for line in output.splitlines() if "per-chunk overhead" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: a chunk is only 4.0 KiB per rank")


# --- traces -----------------------------------------------------------------------------------

def _line(i: int, **override: object) -> str:
    row: dict[str, object] = {"timestamp": i * 100, "input_length": 1000, "output_length": 4, "hash_ids": [i % 3, 100 + i]}
    row.update(override)
    return json.dumps({k: v for k, v in row.items() if v is not None})


@pytest.mark.parametrize(("bad", "says"), [
    (_line(2, hash_ids=None), "missing key 'hash_ids'"),
    ('{"timestamp": 200, "input_length": 1000', "not valid JSON"),
    (_line(2, input_length="1000"), "'input_length' must be a positive integer, not '1000'"),
])
def test_a_bad_trace_line_is_one_line_naming_file_line_and_key(tmp_path: Path, bad: str, says: str) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text("\n".join([_line(0), "", _line(1), bad, _line(3)]) + "\n")  # the blank line 2 is skipped
    code, report, output = run_sim(tmp_path, "replay", str(trace), "--requests", "10")
    assert code == 2
    [line] = output.strip().splitlines()
    assert line.startswith(f"error: {trace}, line 4: {says}")
    assert report == {}


def test_a_trace_shorter_than_requests_is_played_whole_with_a_warning(tmp_path: Path) -> None:
    trace = tmp_path / "short.jsonl"
    trace.write_text("\n".join([_line(0), _line(1), "", _line(2), _line(3), _line(4)]) + "\n\n")
    code, report, output = run_sim(tmp_path, "replay", str(trace), "--requests", "20", "--sequential")
    assert code == 0, output
    assert report["requests"] == report["finished_requests"] == 5
    assert f"warning: {trace} has only 5 requests, fewer than --requests 20: playing those 5" in output
    assert "warning: the trace held only 5 requests, fewer than --requests 20" in output  # again, after a long run


# --- Ctrl-C -----------------------------------------------------------------------------------

def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _shm_of(pids: set[int]) -> list[str]:
    return [e for e in os.listdir(DEV_SHM) if any(created_by(e, pid) for pid in pids)]


class _Output:
    """A child's output, line by line, as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert self._proc.poll() is None, "\n".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n" + "\n".join(self.lines)
            time.sleep(0.05)  # polling the child's output, with a deadline


@pytest.mark.parametrize("to", ["simulator", "process group"])
def test_ctrl_c_stops_everything_cleans_shared_memory_and_reports_what_was_played(tmp_path: Path, to: str) -> None:
    """A Ctrl-C in a terminal reaches the whole process group (server and engine ranks too);
    a SIGINT from a supervisor reaches the simulator alone. Either way: exit 130, a partial
    report, no process and no /dev/shm file of the run left."""
    trace = tmp_path / "slow.jsonl"  # a request every 100 ms: 30 s if nothing stops it
    trace.write_text("\n".join(_line(i) for i in range(300)) + "\n")
    report = tmp_path / "partial.json"
    proc = subprocess.Popen([sys.executable, "-m", "sim", "replay", str(trace), "--requests", "300",
                             "--progress-every-s", "0.2", "--report", str(report)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output = _Output(proc)
    try:
        output.wait_for("progress: ", 120)
        tree = _descendants(proc.pid)
        assert any(e.startswith("lmcache_l1_") for e in _shm_of(tree))  # its server's arena, while it runs
        if to == "simulator":
            os.kill(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "\n".join(output.lines)
    assert "Traceback" not in text, text
    assert "warning: interrupted: a partial report" in text and "hit rate " in text
    partial = json.loads(report.read_text())
    assert partial["interrupted"] is True and partial["mismatched_bytes"] == 0
    assert 0 < partial["finished_requests"] < 300
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)  # its children exit on their own once it has: polled, with a deadline
    assert not [pid for pid in tree if _running(pid)]
    assert _shm_of(tree | {proc.pid}) == []
