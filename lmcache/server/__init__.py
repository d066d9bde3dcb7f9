"""The `lmcache server` process: one CacheEngine behind a ZMQ face and an HTTP face."""
