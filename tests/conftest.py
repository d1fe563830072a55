"""Fixtures shared by the test modules.

``single_thread`` / ``single_thread_module``: torch on one intra-op thread, restored afterwards. The tests
work on small tensors, where a second OpenMP thread adds only synchronisation; on a loaded 2-core machine
those barriers made small float64 ops ~8 ms each and a tiny training run ~30x slower (8 s -> 300 s). One
thread also makes a training run bit-for-bit repeatable. The module-scoped form is in force while a
module's own module-scoped fixtures train.
"""

from __future__ import annotations

import contextlib

import pytest
import torch


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def single_thread_module():
    with _one_thread():
        yield
