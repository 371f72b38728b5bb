"""The one timing helper of bench/: wall seconds of a call, with the device synchronized on both sides
(CUDA work is asynchronous: without the synchronization the clock would stop before the work does)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(function: Callable[[], object], device: str, repeat: int = 1) -> float:
    """Seconds for `repeat` calls of `function` on `device` ("cpu", "cuda", "cuda:1"...)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start
