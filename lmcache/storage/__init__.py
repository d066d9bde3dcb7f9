"""Where chunks live: the L1 cache over the memory pool, and the eviction policies."""
