"""Test defaults: smoke sizes and one BLAS thread per pytest-xdist worker (2 workers on 2 cores),
the project's markers, and the longest tests first.

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
    config.addinivalue_line(
        "markers",
        "long: a test that runs a chapter or a benchmark (half a minute to two minutes); these "
        "run first, so that no pytest-xdist worker is left alone with one at the end.")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("long") is None)   # stable: else as found
