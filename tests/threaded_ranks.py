"""The ranks of one gloo world as threads of the test process.

Each thread has its own default process group (torch's thread-isolation mode and thread-local c10d world, the
set-up of torch's own ``MultiThreadedTestCase``) over one in-memory ``HashStore``; gloo moves the tensors through
loopback TCP exactly as between processes, point-to-point sends included. So the distributed code runs in the test
process: no interpreter start-up per rank, and tools that trace the test process see it (mutmut maps tests to code
that way). Process-level isolation is still checked by the spawned run in ``tests/test_distributed.py``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
import traceback

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.multi_threaded_pg import _install_threaded_pg, _uninstall_threaded_pg

# how long a rank may run (and wait in a collective) before it counts as hung; tools/mutate.py shortens it, since
# a mutant that breaks the ring's addressing leaves the ranks waiting for a peer that never sends
TIMEOUT = float(os.environ.get("FASTCLIP_TEST_RANK_TIMEOUT", "120"))
_LOCK = threading.Lock()  # one threaded world at a time: the thread-local world is installed process-wide


@contextlib.contextmanager
def _one_interpreted_kernel_at_a_time():
    """Under TRITON_INTERPRET=1, serialize kernel launches: the interpreter patches triton.language and keeps the
    grid index process-wide while a kernel runs. A launch holds no collective, so the ranks cannot deadlock."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    run, lock = InterpretedFunction.run, threading.Lock()

    def serialized(self, *args, **kwargs):
        with lock:
            return run(self, *args, **kwargs)

    InterpretedFunction.run = serialized
    try:
        yield
    finally:
        InterpretedFunction.run = run


def run_ranks(world: int, fn, *args, timeout: float | None = None) -> list:
    """``fn(rank, world, *args)`` on ranks 0 .. world-1, each in its own thread with a gloo default process group.

    Returns the ranks' results in rank order. Raises AssertionError with every failing rank's traceback; a rank
    that fails closes its group, so the others fail at once instead of waiting in a collective; a rank still
    running after ``timeout`` seconds (gloo's timeout too; default ``TIMEOUT``) is reported as hung.
    """
    timeout = TIMEOUT if timeout is None else timeout
    results, errors = [None] * world, [None] * world
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=timeout))

    def rank_main(rank):
        try:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout))
            results[rank] = fn(rank, world, *args)
        except BaseException:  # noqa: BLE001 - reported below, whatever it is
            errors[rank] = traceback.format_exc()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    with _LOCK, _one_interpreted_kernel_at_a_time():
        torch._C._distributed_c10d._set_thread_isolation_mode(True)
        _install_threaded_pg()  # also turns autograd's device threads off: each rank's backward runs in its thread
        try:
            threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + timeout
            for r, t in enumerate(threads):
                t.join(max(deadline - time.monotonic(), 0.0))
                if t.is_alive():
                    errors[r] = f"rank {r} still running after {timeout} s (hung in a collective?)"
        finally:
            _uninstall_threaded_pg()
            torch._C._distributed_c10d._set_thread_isolation_mode(False)
    failures = [f"--- rank {r} of {world}:\n{e}" for r, e in enumerate(errors) if e is not None]
    assert not failures, "\n".join(failures)
    return results
