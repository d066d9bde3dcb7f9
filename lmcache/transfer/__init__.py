"""Moving KV bytes: the page descriptor of a registered cache, SHM segments, CUDA IPC."""
