"""Dynamic micro-batching: concurrent Recommend calls share one FAISS search and one ONNX Runtime run.

Calls queue on the event loop. A batch (calls of one bundle, at most `max_batch`, by default 16) leaves for a
compute thread
- at once when no batch is running: a lone call on an idle server never waits;
- at once when `max_batch` calls are waiting;
- otherwise when a compute thread is free and the oldest waiting call has waited `max_wait_s` (by default 0:
  at once, so batches form only while every compute thread is busy).
While every compute thread is busy, calls simply accumulate; the next free thread takes them together. So
batches grow with the load, and at low load nothing changes.

The ranking run of a batch is stopped (ONNX Runtime's terminate flag) at the earliest ranking cut-off of its
calls; those then keep retrieval order (strategy UNRANKED).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass

from hyperrec.core import metrics
from hyperrec.core.bundle import Bundle
from hyperrec.core.compute import Ranked, Work, rank_batch
from hyperrec.core.errors import HyperrecError, Unavailable
from hyperrec.core.ranker import RankingRun

# Batch size when left to the server (max_batch 0). On a GPU one run over many calls costs little more than one;
# on the CPU, make bench and an alternating A/B measured equal or higher capacity at p99 <= 10 ms with batches of
# 16 than without, on the code since the bundle format 2 (docs/performance.md).
AUTO_BATCH = 16


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 0  # 0: automatic (AUTO_BATCH); 1: no batching
    max_wait_s: float = 0.0  # a free thread takes waiting calls at once
    workers: int = 2  # compute threads: batches run at most this many at a time

    @property
    def limit(self) -> int:
        """The most calls computed together."""
        return self.max_batch if self.max_batch > 0 else AUTO_BATCH


@dataclass
class _Waiting:
    bundle: Bundle
    work: Work
    future: asyncio.Future[Ranked]
    arrived: float  # loop.time()


class MicroBatcher:
    """Queues compute work from the event loop and runs it in batches on `executor`. Use from one event loop."""

    def __init__(self, executor: Executor, settings: BatchSettings, candidates: int) -> None:
        self._executor = executor
        self._settings = settings
        self._candidates = candidates
        self._queue: deque[_Waiting] = deque()
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None

    async def rank(self, bundle: Bundle, work: Work) -> Ranked:
        """The compute stage for one call, batched with whatever else is waiting. Raises its failure."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(bundle, work, loop.create_future(), loop.time())
        self._queue.append(waiting)
        self._pump(loop)
        return await waiting.future  # a cancelled caller's work is skipped when its batch forms

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        settings = self._settings
        while self._queue and self._running < settings.workers:
            while self._queue and self._queue[0].future.done():  # its caller gave up (cancelled)
                self._queue.popleft()
            if not self._queue:
                return
            oldest = self._queue[0]
            limit = settings.limit
            due = oldest.arrived + settings.max_wait_s
            if self._running > 0 and len(self._queue) < limit and limit > 1 and loop.time() < due:
                if self._timer is None:
                    self._timer = loop.call_at(due, self._on_timer, loop)
                return
            self._dispatch(loop, self._take(oldest.bundle, limit))

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._pump(loop)

    def _take(self, bundle: Bundle, limit: int) -> list[_Waiting]:
        """Up to `limit` waiting calls of `bundle`, oldest first; calls of other bundles keep their places."""
        batch: list[_Waiting] = []
        rest: deque[_Waiting] = deque()
        while self._queue:
            waiting = self._queue.popleft()
            if waiting.future.done():
                continue
            if waiting.bundle is bundle and len(batch) < limit:
                batch.append(waiting)
            else:
                rest.append(waiting)
        self._queue = rest
        return batch

    def _dispatch(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting]) -> None:
        run = RankingRun()
        cut_offs = [w.work.cutoffs.rank_by for w in batch if w.work.cutoffs.rank_by is not None]
        stop = loop.call_at(min(cut_offs), run.stop) if cut_offs else None
        works = [w.work for w in batch]
        self._running += 1
        metrics.BATCH_SIZE.observe(len(batch))
        try:
            done: ThreadFuture[list[Ranked | HyperrecError]] = self._executor.submit(
                rank_batch, batch[0].bundle, works, self._candidates, run
            )
        except RuntimeError:  # the executor was shut down: the server is stopping
            done = ThreadFuture()
            done.cancel()
            self._finished(loop, batch, done, stop)
            return
        done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finished, loop, batch, f, stop))

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: Sequence[_Waiting],
        done: ThreadFuture[list[Ranked | HyperrecError]],
        stop: asyncio.TimerHandle | None,
    ) -> None:
        if stop is not None:
            stop.cancel()
        self._running -= 1
        error = Unavailable("the server is stopping") if done.cancelled() else done.exception()
        for i, waiting in enumerate(batch):
            if waiting.future.done():
                continue
            if error is not None:
                waiting.future.set_exception(error)
                continue
            result = done.result()[i]
            if isinstance(result, HyperrecError):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)
        self._pump(loop)
