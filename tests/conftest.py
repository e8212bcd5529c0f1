"""Shared test setup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """The tests run tiny layers: one thread is fastest on 2 shared cores (no OpenMP
    contention) and gives bit-reproducible results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
