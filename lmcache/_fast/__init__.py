"""The hot paths: Cython extensions (hashing, the L1 pool) and Numba kernels."""
