"""Opens the tiers a server's --l2-adapter flags name, in lookup order."""

from __future__ import annotations

from collections.abc import Sequence

from lmcache.config import L2AdapterConfig
from lmcache.storage.l2.tier import Tier


def open_tiers(adapters: Sequence[L2AdapterConfig], lookup_timeout_s: float) -> list[Tier]:
    """``lookup_timeout_s`` bounds what a lookup waits for a shared tier to say what it holds.
    A disk directory another server holds raises DirectoryInUse; an unreachable Redis does not
    (its tier starts disconnected and connects when Redis answers)."""
    tiers: list[Tier] = []
    try:
        for a in adapters:
            if a.type == "disk":
                from lmcache.storage.l2.disk import DiskTier

                tiers.append(DiskTier(a.path, a.max_bytes, a.eviction_policy))
            else:
                from lmcache.storage.l2.redis_tier import RedisTier  # imports redis-py only when used

                tiers.append(RedisTier(a.type, a.url, a.nodes, a.namespace, a.connections, a.timeout_ms / 1000,
                                       min(a.timeout_ms / 1000, max(lookup_timeout_s, 0.005))))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return tiers
