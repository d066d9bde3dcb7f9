"""vLLM integration: LMCacheMPConnector (lmcache_mp_connector.py) over the adapters (adapter.py)."""
