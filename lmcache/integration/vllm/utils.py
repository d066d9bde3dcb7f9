"""Compatibility: vLLM 0.33's in-tree LMCacheMPConnector module imports ``mla_enabled`` from here."""

from __future__ import annotations

from typing import Any


def mla_enabled(model_config: Any) -> bool:
    """Whether the model uses multi-head latent attention (its KV is one latent vector per token)."""
    return bool(getattr(model_config, "use_mla", False))
