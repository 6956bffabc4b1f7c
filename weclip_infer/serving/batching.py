"""Batch the network passes of several requests while each request keeps its own ``predict`` call.

A server hands the service several requests at once. Each of them still runs
``Segmenter.predict`` unchanged — decoding checks, resizing, multi-scale + flip fusion, label
hint, argmax and CRF stay one code path for one image or many — but the network calls those
``predict`` calls make are collected and run together:

* every request runs in its own thread, and the threads take turns: exactly one runs at a time
  (no oversubscription of the intra-op thread pool, the same memory profile as one request);
* a thread that reaches the network hands its input over and waits; when every unfinished
  request is waiting, the inputs are grouped by shape (images resized to the same network size,
  at the same scale) and each group runs as one backend call of at most ``max_rows`` images;
  the outputs are split back and the threads continue with fusion, argmax, ... on the model's
  device;
* if a batched call fails, its inputs are retried one by one, so a bad input fails only its own
  request;
* work handed over with :meth:`BatchedNetwork.on_coordinator` (the CRF) runs on the thread
  that called :meth:`~BatchedNetwork.run`: on CPU, torch's intra-op thread pool belongs to the
  calling thread, and heavy torch work from ever new request threads runs slower (each
  thread's pool is cold). Running a batch's CRFs side by side on single-threaded workers
  instead gained only ~8% on 2 cores;
* a request thread lets its idle OpenMP workers go before it waits
  (:func:`~weclip_infer.threads.release_idle_threads`): with more of them alive than CPUs, the
  OpenMP runtime makes every thread sleep at each synchronisation, which made the CRFs of a
  batch about 1.5× slower than the same CRFs alone.

The composition of every batch depends only on the requests (not on timing), and one request's
response is the same as when it is sent alone.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..threads import release_idle_threads
from .serve_config import DEFAULT_NETWORK_BATCH

if TYPE_CHECKING:  # torch is imported when a batch runs, not when the serving package is imported
    import torch

__all__ = ["BatchedNetwork"]

logger = logging.getLogger(__name__)

_worker = threading.local()  # .session: the _Session a request thread belongs to


@dataclass
class _Call:
    order: int  # index of the request that made the call: batches are built in request order
    x: Optional[torch.Tensor]  # a network input, or None for a function call (fn)
    out: Any = None
    error: Optional[BaseException] = None
    done: bool = False
    fn: Optional[Callable[[], Any]] = None


def _input(c: _Call) -> torch.Tensor:
    """The network input of a network call (function calls have none)."""
    assert c.x is not None, "not a network call"
    return c.x


@dataclass
class _Session:
    """One :meth:`BatchedNetwork.run`: its lock is the turn (the request thread holding it runs);
    ``coordinator`` wakes the thread that runs the rounds, ``answered`` the request threads once a
    round is done. Two conditions, so that handing over an input wakes one thread, not all."""

    lock: threading.Lock
    coordinator: threading.Condition
    answered: threading.Condition
    active: int
    pending: List[_Call] = field(default_factory=list)


class BatchedNetwork:
    """A backend wrapper (``B×3×H×W`` → logits) that batches the calls of concurrent requests.

    Outside :meth:`run` (or from any other thread) it simply calls the wrapped backend.
    ``network_calls``, ``batched_rows`` and ``network_seconds`` count the backend calls made, the
    images they held and the time spent in them (for metrics: a request's own ``network@<scale>``
    timing includes waiting for the other requests of its batch).
    """

    def __init__(self, backend: Callable[[torch.Tensor], torch.Tensor], max_rows: int = DEFAULT_NETWORK_BATCH):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        self.backend = backend
        self.max_rows = max_rows
        self.network_calls = 0
        self.batched_rows = 0
        self.network_seconds = 0.0

    # -- the backend interface ------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        session: Optional[_Session] = getattr(_worker, "session", None)
        if session is None:
            return self._forward(x)
        out = self._hand_over(session, _Call(getattr(_worker, "order", 0), x))
        assert out is not None
        return out

    def on_coordinator(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, run on the thread that called :meth:`run` when called from one of its
        request threads (each request's calls in order, after the round's network calls);
        simply ``fn()`` anywhere else. Exceptions reach the caller."""
        session: Optional[_Session] = getattr(_worker, "session", None)
        if session is None:
            return fn()
        return self._hand_over(session, _Call(getattr(_worker, "order", 0), None, fn=fn))

    @staticmethod
    def _hand_over(session: _Session, call: _Call) -> Any:
        session.pending.append(call)  # the caller holds the lock (it is its turn)
        session.coordinator.notify()
        release_idle_threads()  # only the running thread keeps OpenMP workers (see threads)
        while not call.done:
            session.answered.wait()
        if call.error is not None:
            raise call.error
        return call.out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.backend(x)
        finally:
            self.network_calls += 1
            self.batched_rows += int(x.shape[0])
            self.network_seconds += time.perf_counter() - t0

    # -- running requests ----------------------------------------------------------------------------
    def run(self, tasks: Sequence[Callable[[], Any]]) -> List[Any]:
        """Run ``tasks`` (each typically one ``predict`` call) with their network calls batched.

        Returns each task's return value, or the exception it raised, in order.
        """
        if len(tasks) <= 1:
            out: List[Any] = []
            for task in tasks:
                try:
                    out.append(task())
                except Exception as e:  # noqa: BLE001 - handed back, like the batched path
                    out.append(e)
            return out
        lock = threading.Lock()
        session = _Session(lock, threading.Condition(lock), threading.Condition(lock), active=len(tasks))
        results: List[Any] = [None] * len(tasks)

        def worker(i: int) -> None:
            _worker.session, _worker.order = session, i
            with session.lock:  # take a turn: one request thread runs at a time
                try:
                    results[i] = tasks[i]()
                except BaseException as e:  # noqa: BLE001 - handed back to the caller
                    results[i] = e
                finally:
                    session.active -= 1
                    session.coordinator.notify()
                    _worker.session = None

        threads = [threading.Thread(target=worker, args=(i,), name=f"weclip-request-{i}", daemon=True)
                   for i in range(len(tasks))]
        for th in threads:
            th.start()
        with session.lock:
            while True:
                session.coordinator.wait_for(lambda: session.active == 0 or len(session.pending) == session.active)
                if session.active == 0:
                    break
                calls, session.pending = session.pending, []
                self._run_round(calls)  # every unfinished request is waiting on one of these
                session.answered.notify_all()
        for th in threads:
            th.join()
        return results

    def _run_round(self, calls: List[_Call]) -> None:
        import torch

        groups: Dict[Tuple[Any, ...], List[_Call]] = {}
        fns: List[_Call] = []
        for c in sorted(calls, key=lambda c: c.order):
            if c.x is None:
                fns.append(c)
            else:
                groups.setdefault((tuple(c.x.shape[1:]), c.x.dtype, c.x.device), []).append(c)
        with torch.inference_mode():
            for group in groups.values():
                for chunk in self._chunks(group):
                    self._run_chunk(chunk)
        for c in fns:
            try:
                assert c.fn is not None
                c.out = c.fn()
            except Exception as e:  # noqa: BLE001 - raised in the request's own thread
                c.error = e
            c.done = True

    def _chunks(self, group: List[_Call]) -> List[List[_Call]]:
        chunks: List[List[_Call]] = [[]]
        rows = 0
        for c in group:
            n = int(_input(c).shape[0])
            if chunks[-1] and rows + n > self.max_rows:
                chunks.append([])
                rows = 0
            chunks[-1].append(c)
            rows += n
        return chunks

    def _run_chunk(self, chunk: List[_Call]) -> None:
        import torch

        if len(chunk) == 1:
            self._run_alone(chunk[0])
            return
        try:
            out = self._forward(torch.cat([_input(c) for c in chunk], 0))
            parts = torch.split(out, [int(_input(c).shape[0]) for c in chunk], 0)
        except Exception:  # noqa: BLE001 - retried one by one: only a failing input fails
            logger.warning("a batched network call of %d requests failed; running them one by one", len(chunk),
                           exc_info=True)
            for c in chunk:
                self._run_alone(c)
            return
        for c, p in zip(chunk, parts):
            c.out, c.done = p, True

    def _run_alone(self, c: _Call) -> None:
        try:
            c.out = self._forward(_input(c))
        except Exception as e:  # noqa: BLE001 - raised in the request's own thread
            c.error = e
        c.done = True
