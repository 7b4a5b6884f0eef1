"""Helpers for the ttrpc tests: run a coroutine on a fresh loop and fail if it leaves tasks behind."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

Runner = Callable[..., Any]


def run_checked(coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
    """asyncio.run with a watchdog; asserts every other task has finished when the coroutine returns."""

    async def main() -> T:
        async with asyncio.timeout(timeout):
            result = await coro
        await asyncio.sleep(0)  # let done-callbacks run
        leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leaked, f"tasks left running: {leaked}"
        return result

    return asyncio.run(main())


@pytest.fixture
def arun() -> Runner:
    return run_checked


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # A short directory: unix socket paths are limited to 107 bytes, pytest's tmp_path can exceed it.
    path = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
