"""Shared test setup."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run by default, so CI cannot fail on a
# draw nobody saw before; HYPOTHESIS_PROFILE=explore draws new ones (run it while developing).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """The tests run tiny layers: one thread is fastest on 2 shared cores (no OpenMP
    contention) and gives bit-reproducible results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
