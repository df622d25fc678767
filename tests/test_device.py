"""The chapters' device choice: attribution on a GPU when one is present, with the CPU's scores.

The GPU test skips without CUDA (README, "Versions"); the CPU half always runs.
"""
from __future__ import annotations

import pytest
import torch

import retrac_lib as rl


def test_chapters_use_a_gpu_exactly_when_one_is_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert rl.book.device() == expected
    assert rl.book.attribution_options(smoke=True)["device"] == expected
    assert rl.book.counterfactual_setup(smoke=True).attribution["device"] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_cuda_attribution_matches_cpu(tiny_run, method, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    queries = tiny_run.data.images[:3]
    options = dict(timesteps=5, n_noise=3, progress=False)
    cpu = rl.attribute(tiny_run, queries, method, device="cpu", **options)
    gpu = rl.attribute(tiny_run, queries, method, device="cuda", **options)
    assert gpu.scores.device.type == "cpu"
    torch.testing.assert_close(gpu.scores, cpu.scores, rtol=1e-4, atol=1e-6 * cpu.scores.abs().max().item())
