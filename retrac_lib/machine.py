"""Which machine computed a number: names for provenance.

Two CPUs round differently, so a trained model's numbers differ between them in their last
digits and more (chapter 9's reverification). Every stored result names its machine: a study
result file (``device_name``) and each retrain of a loss ledger (its entry's ``machine``).
"""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model (``/proc/cpuinfo`` on Linux, else ``platform``) and the vector
    instructions torch's kernels use on it (e.g. ``"AMD EPYC, AVX2"``)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def device_name(device) -> str:
    """``device`` with what computes on it: a GPU's name, or the CPU's (``cpu_name``) and this
    process's torch thread count."""
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({cpu_name()}, {torch.get_num_threads()} threads)"
