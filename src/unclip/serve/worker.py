"""One thread runs the pipeline; requests wait in a bounded queue and generations are batched.

Each request becomes a `Job` holding a `Task`. When the worker is free it takes the oldest job
and, for generations, every queued generation with the same options (side, steps, guidances,
sampler, prior) up to `max_batch` images, and makes them in one `pipe.generate` call with one
seed per image: request r's image i uses r's seed + i (a seed drawn for it when it gave none),
exactly as if it ran alone. Edits and variations run one request at a time, its n images
together. No call makes more than `max_batch` images: a larger n is made that many at a time (a
variation request's image inverted once, for every piece).

The queue holds at most `max_queue` waiting jobs; past that `submit` raises `Busy` with an
estimate of the seconds until a place frees up, that is until the running call ends (the 429
answer's Retry-After): its images weighted by their sampling steps (and an edit's resamplings),
at the measured seconds per image of default steps, less the time it has run. `cancel` drops
a waiting job, or marks a running one: the batch stops at the next sampling step once every
job in it is cancelled. Progress (stage and step) is kept on each job for the page.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field

from unclip.errors import SamplingError, UnclipError
from unclip.pipeline.tasks import INPAINT_RESAMPLE
from unclip.serve.schemas import ApiError
from unclip.serve.uploads import encode_png

log = logging.getLogger(__name__)

KEEP_FINISHED_S = 120.0  # how long a finished job's progress stays readable


class Busy(Exception):
    """The queue is full; `retry_after` estimates the seconds until a place frees up."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the server is busy: its queue is full ({queued} waiting); retry after {retry_after} s")
        self.queued, self.retry_after = queued, retry_after


class Cancelled(Exception):
    """Raised from the sampling callback to stop a batch nobody waits for any more."""


@dataclass
class Task:
    """What one request asks for.

    kind: "generate", "vary" or "edit"; side: the answer's side; cascade_side: the native side
    the pipeline stops at; options: keyword arguments passed to the pipeline call as they are
    (steps, guidance_scale, ...); image and mask: PIL images for edits and variations.
    """

    kind: str
    n: int
    side: int
    cascade_side: int
    prompt: str | None = None
    seed: int | None = None
    options: dict = field(default_factory=dict)
    image: object = None
    mask: object = None

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one pipeline call; None: this task runs alone."""
        if self.kind != "generate":
            return None
        return (self.cascade_side, tuple(sorted(self.options.items())))


class Job:
    """A task's life: queued → running → done | failed | cancelled, with its progress and result."""

    def __init__(self, task: Task, job_id: str, loop: asyncio.AbstractEventLoop):
        self.task, self.id = task, job_id
        self.state, self.stage, self.step, self.total = "queued", None, 0, 0
        self.seed: int | None = task.seed
        self.pngs: list[bytes] = []
        self.error: ApiError | None = None
        self.cancelled = False
        self.finished_at: float | None = None
        self._loop, self._done = loop, loop.create_future()

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the job to finish; True when it has."""
        await asyncio.wait({self._done}, timeout=timeout)
        return self.done

    def _finish(self, state: str) -> None:
        self.state, self.finished_at = state, time.monotonic()
        try:
            self._loop.call_soon_threadsafe(_resolve, self._done)
        except RuntimeError:  # the event loop is closed: nobody waits
            pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Worker:
    """The queue and the thread that runs `pipe` for it; `start()` it, `stop()` it."""

    def __init__(self, pipe, *, model_id: str, max_queue: int = 64, max_batch: int = 8, default_steps: int = 25):
        """default_steps: the decoder's steps when a request names none (the unit of `seconds_per_image`)."""
        self.pipe, self.model_id, self.default_steps = pipe, model_id, default_steps
        self.max_queue, self.max_batch = max_queue, max_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.seconds_per_image = 1.0  # running estimate at default steps (`_cost`), for Retry-After
        self._started = 0.0  # when the running call began
        self.stats = collections.Counter()

    # --- the request side (event loop) ---------------------------------------------------------

    def submit(self, task: Task, job_id: str | None = None) -> Job:
        """Queue `task`; raises `Busy` when the queue is full, `ApiError` for a job id in use."""
        job_id = job_id or secrets.token_hex(8)
        with self._lock:
            self._forget_finished()
            if job_id in self._jobs:
                raise ApiError(400, f"job id {job_id!r} is already in use", param="Unclip-Job", code="duplicate_job")
            if len(self._queue) >= self.max_queue:
                self.stats["refused"] += 1
                raise Busy(len(self._queue), self._retry_after())
            job = Job(task, job_id, asyncio.get_running_loop())
            self._queue.append(job)
            self._jobs[job_id] = job
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, mark it if it runs."""
        with self._lock:
            if job.done:
                return
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self.stats["cancelled"] += 1
                job._finish("cancelled")

    def progress(self, job_id: str) -> dict | None:
        """What the page shows for a job: its state, queue position, stage and step."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            position = self._queue.index(job) + 1 if job.state == "queued" else 0
            return {"id": job.id, "state": job.state, "position": position, "stage": job.stage,
                    "step": job.step, "total": job.total, "seed": job.seed}

    def status(self) -> dict:
        with self._lock:
            return {"queued": len(self._queue), "running": len(self._running), "max_queue": self.max_queue,
                    "max_batch": self.max_batch, "seconds_per_image": round(self.seconds_per_image, 3),
                    **self.stats}

    def _cost(self, task: Task) -> float:
        """`task`'s work in images of default steps: sampling time grows with the steps asked for, and
        an edit samples each step `resample` times."""
        steps = task.options.get("steps") or self.default_steps
        resample = task.options.get("resample", INPAINT_RESAMPLE) if task.kind == "edit" else 1
        return task.n * steps / self.default_steps * resample

    def _retry_after(self) -> int:
        """Seconds until a queue place frees up: until the running call ends (lock held)."""
        if self._running:
            cost = sum(self._cost(job.task) for job in self._running)
            wait = cost * self.seconds_per_image - (time.perf_counter() - self._started)
        else:  # the worker is about to take the head of the queue
            wait = self._cost(self._queue[0].task) * self.seconds_per_image if self._queue else 0.0
        return max(1, min(600, math.ceil(wait)))

    def _forget_finished(self) -> None:
        now = time.monotonic()
        for job_id in [i for i, j in self._jobs.items() if j.done and now - j.finished_at > KEEP_FINISHED_S]:
            del self._jobs[job_id]

    # --- the worker thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="unclip-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every waiting job, stop the running batch at its next step, end the thread."""
        with self._lock:
            self._stopping = True
            while self._queue:
                self._queue.popleft()._finish("cancelled")
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
                self._running, self._started = batch, time.perf_counter()
            self._execute(batch)
            with self._lock:
                self._running = []

    def _take_batch(self) -> list[Job]:
        """The oldest job and the queued generations that can share its call (lock held)."""
        head = self._queue.popleft()
        batch, key = [head], head.task.batch_key()
        if key is not None:
            images = head.task.n
            for job in list(self._queue):
                if images + job.task.n <= self.max_batch and job.task.batch_key() == key:
                    self._queue.remove(job)
                    images += job.task.n
                    batch.append(job)
        for job in batch:
            job.seed = job.task.seed if job.task.seed is not None else secrets.randbelow(2**31)
            job.state = "running"
        return batch

    def _execute(self, batch: list[Job]) -> None:
        started = time.perf_counter()

        def callback(stage: str, step) -> None:
            if self._stopping or all(job.cancelled for job in batch):
                raise Cancelled
            for job in batch:
                job.stage, job.step, job.total = stage, step.index + 1, step.total

        count = sum(job.task.n for job in batch)
        try:
            images = self._call(batch, callback)
            offset = 0
            for job in batch:  # inside the guard too: a failed encoding must not end the worker thread
                job.pngs = [encode_png(image, job.task.side, self._params(job, i))
                            for i, image in enumerate(images[offset:offset + job.task.n])]
                offset += job.task.n
        except Cancelled:
            self._finish(batch, "cancelled")
            return
        except SamplingError as err:  # the model failed, not the request
            log.error("the pipeline failed on a batch of %d request(s): %s", len(batch), err)
            for job in batch:
                job.error = ApiError(500, f"The server had an error while processing your request: {err}",
                                     type="server_error")
            self._finish(batch, "failed")
            return
        except UnclipError as err:
            for job in batch:
                job.error = ApiError(400, str(err), code="invalid_value")
            self._finish(batch, "failed")
            return
        except Exception:  # noqa: BLE001 - the worker must outlive any one request
            log.exception("the pipeline failed on a batch of %d request(s)", len(batch))
            for job in batch:
                job.error = ApiError(500, "The server had an error while processing your request.",
                                     type="server_error")
            self._finish(batch, "failed")
            return
        cost = sum(self._cost(job.task) for job in batch)
        seconds = time.perf_counter() - started
        self.seconds_per_image = 0.7 * self.seconds_per_image + 0.3 * seconds / cost
        self.stats["batches"] += 1
        self.stats["images"] += count
        self.stats["largest_batch"] = max(self.stats["largest_batch"], count)
        self._finish(batch, "done")

    def _call(self, batch: list[Job], callback) -> list:
        """The batch's images, made `max_batch` at a time (a request's n may be larger): image i of a
        request draws from its seed + i, so the split changes no image."""
        task, pipe, images = batch[0].task, self.pipe, []
        if task.kind == "generate":
            prompts = [job.task.prompt for job in batch for _ in range(job.task.n)]
            seeds = [job.seed + i for job in batch for i in range(job.task.n)]
            for at in range(0, len(prompts), self.max_batch):
                images += pipe.generate(prompts[at:at + self.max_batch], n=1, seed=seeds[at:at + self.max_batch],
                                        size=task.cascade_side, callback=callback, **task.options)
            return images
        inversion = None  # a split variation request inverts its image once, for every piece
        if task.kind == "vary" and task.n > self.max_batch:
            inversion = pipe.invert(task.image, steps=task.options.get("steps"),
                                    guidance_scale=task.options.get("guidance_scale"), callback=callback)
        for at in range(0, task.n, self.max_batch):
            n, seed = min(self.max_batch, task.n - at), batch[0].seed + at
            if task.kind == "vary":
                images += pipe.variations(task.image, n=n, seed=seed, callback=callback, size=task.cascade_side,
                                          inversion=inversion, **task.options)
            else:
                images += pipe.inpaint(task.image, task.mask, task.prompt, n=n, seed=seed, callback=callback,
                                       size=task.cascade_side, **task.options)
        return images

    def _params(self, job: Job, index: int) -> dict:
        verb = {"generate": "generate", "vary": "vary", "edit": "inpaint"}[job.task.kind]
        return {"verb": verb, "model": self.model_id, "prompt": job.task.prompt, "seed": job.seed + index,
                "size": job.task.side, "native_size": job.task.cascade_side, **job.task.options, "index": index}

    def _finish(self, batch: list[Job], state: str) -> None:
        with self._lock:
            for job in batch:
                final = "cancelled" if job.cancelled else state
                self.stats[final] += 1
                job._finish(final)
