"""The bounded queue of jobs and the one worker thread that runs them on the model.

Torch is never called concurrently on the model: every generation (and every feature cache
installed or removed) happens on the worker thread, and the event loop only queues jobs and
reads their results.  Batching rule: the worker takes the oldest waiting job; if it is
batchable (``jobs.Job.batchable``) it waits until ``window_s`` after that job arrived (not
longer) for more jobs with the same ``key``, and runs them all, up to ``max_batch`` images, as
ONE pipeline call with each job's own seeds (``Pipeline(prompts, seeds=...)``: each image's
noise is drawn from its own seed, so a batched image equals the same request run alone).
Other jobs wait in order; an unbatchable job runs alone.  When ``queue_size`` jobs wait,
``submit`` raises ``QueueFull`` (the server answers 503 with Retry-After).  A waiting job that
was cancelled or ran past its deadline (``Job.should_stop``) is failed and dropped, never run."""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque

from ..errors import UserError


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Batcher:
    """``run_batch(jobs)`` is called on the worker thread with 1 or more jobs of one key."""

    def __init__(self, run_batch, window_s: float = 0.02, max_batch: int = 8, queue_size: int = 64,
                 on_batch=None):
        if max_batch < 1 or queue_size < 1 or window_s < 0:
            raise UserError("--max-batch and --queue-size must be >= 1 and --batch-window-ms >= 0")
        self.run_batch, self.window_s, self.max_batch, self.queue_size = run_batch, window_s, max_batch, queue_size
        self.on_batch = on_batch
        self._waiting: deque = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.running = 0
        self.last_batch_s = 1.0   # for Retry-After
        self._thread = threading.Thread(target=self._work, name="sdinfer-model", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for job in left:
            job.fail(RuntimeError("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Jobs waiting (not the one running)."""
        return len(self._waiting)

    def submit(self, job) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(max(1, round(self.last_batch_s * (1 + len(self._waiting) / self.max_batch))))
            self._waiting.append(job)
            self._cv.notify_all()

    def discard(self, job) -> None:
        """Take a cancelled job out of the queue now (the worker would drop it at its turn)."""
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                self._cv.notify_all()

    # ---- the worker thread ------------------------------------------------------------
    def take(self, now=time.monotonic) -> list:
        """The next batch (blocks until there is one; [] when stopped)."""
        with self._cv:
            while True:
                batch = self._next(now)
                if batch is None:
                    return []
                if batch:
                    return batch

    def _next(self, now) -> list | None:
        """One try at a batch under the lock: None when stopped, [] when every job chosen was
        cancelled while it waited."""
        while not self._waiting and not self._stop:
            self._cv.wait()
        self._drop_stopped()
        if self._stop:
            return None
        if not self._waiting:
            return []
        first = self._waiting[0]
        if not first.batchable or first.n >= self.max_batch:
            return [self._waiting.popleft()]
        deadline = first.arrival + self.window_s
        while True:
            chosen, images = [], 0
            for job in self._waiting:
                if job.batchable and job.key == first.key and images + job.n <= self.max_batch:
                    chosen.append(job)
                    images += job.n
            left = deadline - now()
            if images >= self.max_batch or left <= 0 or self._stop:
                break
            self._cv.wait(left)
            self._drop_stopped()
        for job in chosen:
            if job in self._waiting:
                self._waiting.remove(job)
        return [job for job in chosen if job.should_stop() is None]

    def _drop_stopped(self) -> None:
        for job in [j for j in self._waiting if j.should_stop() is not None]:
            self._waiting.remove(job)
            job.fail(job.should_stop())

    def _work(self) -> None:
        while True:
            batch = self.take()
            if not batch:
                return
            start = time.perf_counter()
            self.running = sum(job.n for job in batch)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.run_batch(batch)
            except BaseException as err:   # a failed batch fails its jobs, never the worker
                for job in batch:
                    job.fail(err)
            finally:
                self.running = 0
                self.last_batch_s = time.perf_counter() - start
