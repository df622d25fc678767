"""Test defaults: smoke sizes and one BLAS thread per pytest-xdist worker (2 workers on 2 cores),
and the project's marker.

nbmake's kernels inherit this environment, so notebooks run in smoke mode too.
"""
import os

os.environ.setdefault("RETRAC_SMOKE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "version_independent: a test of processes, crashes, files or the source's layering, "
        "whose outcome the installed versions of diffusers, numpy and the rest do not change "
        "(torch is the same in both of CI's environments, and the numbers these tests pass "
        "through are tested against the wheel by the other tests). CI runs it once, in the "
        "README's command; .ci/reader-install does not run it again against the wheel with "
        "Colab's versions.")
