"""Worker threads for a pass over tensors: an ordered map within a memory budget, and torch's
CPU thread count.

extract-lora runs tensor pairs side by side, each torch op on one CPU thread: the cores
are used by running pairs at once, not by splitting small matrix products across OpenMP
threads, whose spin-waiting slows everything down badly on a busy machine.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """Run a block with `count` torch CPU threads (None: unchanged)."""
    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ordered_parallel_map(work, items, *, cost, budget: int, workers: int):
    """Yield work(item) for each item, in the items' order, on `workers` threads, with up to
    2 x workers items in flight (queued, running, or done and not yet consumed) while their
    summed cost(item) stays within `budget`; an item costing more than the budget runs
    alone. With the largest item's memory footprint as the budget, peak memory stays that
    of one item at a time. Twice as many items in flight as threads keeps a thread busy
    while the oldest item, which must be yielded first, is still running."""
    if workers <= 1:
        yield from map(work, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="longctx-worker")
    in_flight: deque = deque()  # (future, cost), oldest first
    used = 0
    try:
        for item in items:
            item_cost = cost(item)
            while in_flight and (len(in_flight) >= 2 * workers or used + item_cost > budget):
                future, done_cost = in_flight.popleft()
                used -= done_cost
                yield future.result()
            in_flight.append((pool.submit(work, item), item_cost))
            used += item_cost
        while in_flight:
            yield in_flight.popleft()[0].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
