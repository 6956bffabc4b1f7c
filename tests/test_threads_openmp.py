"""Tests of weclip_infer.threads.release_idle_threads and its use by BatchedNetwork: a thread
that blocks lets its idle OpenMP workers go, so only the computing thread keeps a team."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from weclip_infer.threads import release_idle_threads


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


needs_runtime = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc (Linux)")


@needs_runtime
def test_release_lets_a_threads_openmp_team_exit_and_it_comes_back():
    x = torch.rand(1 << 22)
    seen: dict = {}

    def work():
        before = _tasks()
        (x * 2).sum()  # a parallel operation: this thread's team of OpenMP workers starts
        seen["with_team"] = _tasks() - before
        seen["released"] = release_idle_threads()
        seen["after_release"] = _tasks() - before
        seen["again"] = float((x * 2).sum())  # still works: the team starts again

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # new threads take the process-wide count
    try:
        th = threading.Thread(target=work)
        th.start()
        th.join()
    finally:
        torch.set_num_threads(threads)
    assert seen["released"] is True
    assert seen["with_team"] >= 1 and seen["after_release"] == 0
    assert seen["again"] == pytest.approx(float((x * 2).sum()))


def test_request_threads_release_their_workers_before_waiting(monkeypatch):
    from weclip_infer.serving import batching

    calls = []
    monkeypatch.setattr(batching, "release_idle_threads", lambda: calls.append(threading.current_thread().name))
    net = batching.BatchedNetwork(lambda x: x + 1)
    out = net.run([lambda i=i: net(torch.full((1, 3, 4, 4), float(i))) for i in range(3)])
    assert [float(o[0, 0, 0, 0]) for o in out] == [1.0, 2.0, 3.0]
    assert sorted(calls) == [f"weclip-request-{i}" for i in range(3)]  # each waiting request thread
