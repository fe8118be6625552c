"""A request made into a job: its settings resolved against the server's defaults and checked
against the model, and its progress, which the worker thread publishes and any number of
event-stream readers follow on the event loop.

``resolve`` turns a ``GenerationRequest`` into a ``Job`` or raises ``UserError`` naming the
problem and the fix (unknown sampler, a size the model does not take, ``n`` out of range,
words the model's tokenizer does not know, an unknown feature cache).  A job is *batchable*
when running it inside a larger pipeline call gives the same images as running it alone: a
step-by-step sampler that draws no noise of its own (the pipeline seeds a stochastic sampler's
generator from the batch's first seed), a fixed step count and sampler, and feature caches whose schedule does not depend on the batch's data (``BATCH_SAFE_CACHES``).
Jobs with equal ``key`` may share a call (approximate-cache jobs only with each other: the
cache runs them as one call per step they resume at)."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field

from ..errors import UserError
from .schemas import MAX_SEED, GenerationRequest

# caches whose compute-or-reuse schedule is fixed by the step index alone, so a sample's
# result does not depend on the others in its batch (the data-dependent ones, fbcache, dbcache,
# teacache, magcache, blockcache, l2c, decide on the whole batch, and run alone)
BATCH_SAFE_CACHES = frozenset({"deepcache", "fora", "taylorseer", "tgate"})


# spec options that name a file (DPM-Solver-v3's statistics, the calibrated caches' calibrations):
# a request never names a file on the server (the server's own flags may)
FILE_OPTIONS = frozenset({"stats", "calibration", "path", "file", "predictor"})
_OPTION = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*([^,;+)]*)")


def check_no_files(spec: str, field: str) -> None:
    """Refuse a request's sampler or cache spec that names a file."""
    for key, value in _OPTION.findall(spec):
        if key.lower() in FILE_OPTIONS or "/" in value or "\\" in value:
            raise UserError(f"{field} {spec!r}: option {key}={value} names a file, which a request may not; "
                            f"leave it out (the server uses the files beside its model) or start the server "
                            f"with that {field} as its default")


class ApproxCacheUnavailable(Exception):
    """``approx_cache: true`` on a server without ``sdinfer.serve.approx_cache``."""


class JobCancelled(Exception):
    """A job stopped before its images: its client went away, asked to cancel, or its time ran
    out (``timed_out``)."""

    def __init__(self, reason: str, timed_out: bool = False):
        super().__init__(reason)
        self.timed_out = timed_out


@dataclass(frozen=True)
class ServeSettings:
    """The server's defaults and limits (``sdinfer serve``'s flags)."""

    model: str = "default"
    sampler: str = "ddim"
    steps: int | str = 50
    guidance_scale: float = 4.0
    accelerate: str | None = None
    spacing: str | None = None
    analytic_first_step: bool = False
    batch_window_ms: float = 20.0
    max_batch: int = 8
    queue_size: int = 64
    max_n: int = 8
    request_timeout_s: float = 600.0
    max_body_bytes: int = 64 * 1024
    api_key: str | None = None


def supported_sizes(pipe) -> list[int]:
    """The square sizes the server offers: half, once and twice the model's own, where the model
    takes them."""
    native = pipe.model.native_size
    sizes = []
    for side in (native // 2, native, native * 2):
        try:
            if side >= 1 and pipe.check_size(side) == side:
                sizes.append(side)
        except UserError:
            pass
    return sizes


def is_deterministic(solver) -> bool:
    """Whether a sampler draws no noise of its own (known classes only; anything else: no)."""
    from ..samplers import (DDIM, PLMS, DPMSolverMultistep, DPMSolverSinglestep, DPMSolverV3, Euler, Heun,
                            SamplerSchedule, UniPC)

    if isinstance(solver, SamplerSchedule):
        return all(is_deterministic(seg.sampler) for seg in solver.segments)
    if isinstance(solver, DDIM):
        return solver.eta == 0
    if isinstance(solver, DPMSolverMultistep):
        return not solver.sde
    return isinstance(solver, (DPMSolverSinglestep, DPMSolverV3, UniPC, Euler, Heun, PLMS))


def check_accelerate(spec: str) -> list[str]:
    """The method names of a ``+``-joined feature-cache spec; a UserError for a bad one."""
    from .. import cache

    names = []
    for item in filter(None, (part.strip() for part in spec.split("+"))):
        try:
            names.append(cache.method_of(cache.parse_spec(item)))
        except ValueError as err:
            raise UserError(f"accelerate {item!r}: {err}") from None
    if not names:
        raise UserError(f"accelerate {spec!r} names no cache; e.g. deepcache:interval=3, or 'none'")
    return names


@dataclass
class Job:
    id: str
    prompt: str
    seeds: list[int]
    config: object                      # GenerationConfig (seed = seeds[0])
    accelerate: str | None
    approx_cache: bool
    batchable: bool
    key: tuple
    size: int
    response_format: str = "url"
    user: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    events: list = field(default_factory=list)
    status: str = "queued"
    deadline: float | None = None       # time.monotonic() after which the job is cancelled
    cancelled: JobCancelled | None = None
    _changed: asyncio.Event | None = None
    listener: object = None             # called with each event on the loop (a shared job board)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the event loop that will read the job (call on that loop)."""
        self.loop = loop
        self.future = loop.create_future()
        self._changed = asyncio.Event()
        self._publish({"event": "queued", "job_id": self.id, "n": self.n})

    # ---- from any thread -----------------------------------------------------------
    def should_stop(self) -> JobCancelled | None:
        """Why the job should stop now (cancelled, or past its deadline); None to go on."""
        if self.cancelled is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.cancelled = JobCancelled("the request took longer than the server's timeout "
                                          f"({self.deadline - self.arrival:g} s); ask for fewer steps or "
                                          "images, or retry when the server is less busy", timed_out=True)
        return self.cancelled

    def cancel(self, reason: str) -> None:
        """Stop the job: the worker drops it from the queue, or stops its batch at the next step
        when every job of the batch is cancelled; its images, if any are made, are not stored."""
        if self.cancelled is None:
            self.cancelled = JobCancelled(reason)
        if self.loop is not None:
            self.fail(self.cancelled)

    # ---- from the worker thread --------------------------------------------------
    def publish(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self._publish, event)

    def finish(self, outcomes: list, payload: dict) -> None:
        self.loop.call_soon_threadsafe(self._finish, outcomes, payload, None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self._finish, None, None, error)

    # ---- on the event loop --------------------------------------------------------
    def _publish(self, event: dict) -> None:
        if event.get("event") == "running":
            self.status = "running"
        self.events.append(event)
        if self.listener is not None:
            self.listener(event)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _finish(self, outcomes, payload, error) -> None:
        if self.future.done():
            return
        if error is not None:
            self.status = "cancelled" if isinstance(error, JobCancelled) else "failed"
            self.future.set_exception(error)
            self.future.exception()   # retrieved: the request that waited for it may be gone
            self._publish({"event": "error", "job_id": self.id, "message": _message(error),
                           "status": _status_of(error)})
        else:
            self.status = "done"
            self.future.set_result(outcomes)
            self._publish({"event": "done", "job_id": self.id, **payload})

    async def follow(self):
        """Every event so far, then each new one, until ``done`` or ``error``."""
        seen = 0
        while True:
            changed = self._changed
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                yield event
                if event["event"] in ("done", "error"):
                    return
            await changed.wait()


def _message(error: BaseException) -> str:
    return str(error) if isinstance(error, (UserError, JobCancelled)) else f"generation failed: {type(error).__name__}: {error}"


def _status_of(error: BaseException) -> int:
    if isinstance(error, JobCancelled):
        return 504 if error.timed_out else 499
    return 400 if isinstance(error, UserError) else 500


def resolve(request: GenerationRequest, settings: ServeSettings, pipe, model_name: str,
            approx_available: bool) -> Job:
    """The job of a request, every setting checked (``UserError`` naming the fix)."""
    from ..generation_config import GenerationConfig

    if request.model is not None and request.model not in (model_name, pipe.model.name):
        raise UserError(f"model {request.model!r} is not served here; this server runs {model_name!r} "
                        "(leave model out, or start another server with --model)")
    if not 1 <= request.n <= settings.max_n:
        raise UserError(f"n must be between 1 and {settings.max_n}, got {request.n}; ask for fewer images "
                        "per request")
    sizes = supported_sizes(pipe)
    if request.size is None:
        size = pipe.model.native_size
    else:
        size = int(request.size.partition("x")[0])
        if size not in sizes:
            names = ", ".join(f"{s}x{s}" for s in sizes)
            raise UserError(f"size {request.size} is not one model {model_name} supports; use one of {names}")
    unknown = pipe.unknown_words(request.prompt)
    if unknown:
        raise UserError(f"prompt has words model {model_name}'s text encoder does not know: {', '.join(unknown)}; "
                        "rephrase without them (the default models know captions such as "
                        "'a small red circle in the top left on a black background')")
    own_sampler = request.sampler is None
    for spec, name in ((request.sampler, "sampler"), (request.accelerate, "accelerate")):
        if spec is not None:
            check_no_files(spec, name)
    sampler = settings.sampler if own_sampler else request.sampler.strip()
    steps = settings.steps if request.steps is None else request.steps
    guidance = settings.guidance_scale if request.guidance_scale is None else request.guidance_scale
    seed = secrets.randbelow(2**31) if request.seed is None else request.seed
    if seed + request.n - 1 > MAX_SEED:
        raise UserError(f"seed {seed} + n - 1 is larger than {MAX_SEED}; choose a smaller seed")
    config = GenerationConfig(steps=steps, sampler=sampler, guidance_scale=guidance, seed=seed, size=size,
                              spacing=settings.spacing if own_sampler else None,
                              analytic_first_step=settings.analytic_first_step if own_sampler else False)
    accelerate = settings.accelerate if request.accelerate is None else request.accelerate.strip()
    if accelerate is not None and accelerate.lower() in ("", "none"):
        accelerate = None
    methods = check_accelerate(accelerate) if accelerate else []
    if request.approx_cache and not approx_available:
        raise ApproxCacheUnavailable()
    batchable = (steps != "auto" and sampler != "auto" and set(methods) <= BATCH_SAFE_CACHES
                 and _batchable_sampler(config))
    key = (steps, sampler, float(guidance), size, config.spacing, config.analytic_first_step, accelerate,
           request.approx_cache)
    now = time.monotonic()
    return Job(id=uuid.uuid4().hex, prompt=request.prompt, seeds=[seed + i for i in range(request.n)],
               arrival=now, deadline=now + settings.request_timeout_s,
               config=config, accelerate=accelerate, approx_cache=request.approx_cache, batchable=batchable,
               key=key, size=size, response_format=request.response_format, user=request.user)


def _batchable_sampler(config) -> bool:
    from ..samplers.base import steps_one_by_one

    solver = config.make_sampler()
    return steps_one_by_one(solver) and is_deterministic(solver)
