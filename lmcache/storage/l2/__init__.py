"""L2: tiers under L1 (local disk today) that outlive the process and hold more than RAM."""
