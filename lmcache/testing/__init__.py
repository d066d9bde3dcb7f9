"""Helpers shared by the tests, benchmarks, scripts and the simulator; never imported by the server."""
