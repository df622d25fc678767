"""Test defaults: smoke sizes and one BLAS thread per pytest-xdist worker (2 workers on 2 cores).

nbmake's kernels inherit this environment, so notebooks run in smoke mode too.
"""
import os

os.environ.setdefault("RETRAC_SMOKE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
