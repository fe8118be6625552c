"""The FastAPI app of ``sdinfer serve``: ``create_app(pipe, settings, store)``.

Routes: ``POST /v1/images/generations`` (the OpenAI Images API shape, synchronous),
``POST /v1/jobs`` (the same body; answers 202 with a job id at once), ``GET /v1/jobs/{id}``
(status, and the images once done), ``GET /v1/jobs/{id}/events`` (server-sent events:
``queued``, ``running``, ``step`` i of n, then ``done`` with the image ids, or ``error``),
``GET /v1/images`` (the gallery, newest first, ``limit`` and ``before``), ``GET /v1/images/{id}``
(the PNG, by id only), ``GET /v1/config`` (the served model, defaults, sizes, samplers),
``GET /healthz``, ``GET /metrics`` and ``GET /`` (the page in ``page/``).  Errors are OpenAI's
error object, ``{"error": {"message", "type", "param"}}``, with 400 for bad input, 404 for an
unknown id, 401 without the server's API key, 413 for a body over the limit (``guard.py``), 501
for ``approx_cache`` on a server without the approximate cache, 503 with ``Retry-After`` when
the queue is full and 504 when a request outlives ``--request-timeout``.  A synchronous request
whose client disconnects is cancelled (``Job.cancel``: dropped from the queue, or its batch
stopped at the next step when no other job needs it); ``DELETE /v1/jobs/{id}`` cancels a job."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .batching import Batcher, QueueFull
from .guard import Guard
from .jobs import ApproxCacheUnavailable, JobCancelled, ServeSettings, resolve, supported_sizes
from .metrics import CONTENT_TYPE, Metrics, RequestMetrics
from .runner import Runner
from .schemas import ErrorResponse, GenerationRequest, GenerationResponse, JobCreated
from .store import valid_id

PAGE = Path(__file__).parent / "page"
LOG = logging.getLogger("sdinfer.serve")
MAX_JOBS_KEPT = 1000
MAX_LIST = 200
ERRORS = {"model": ErrorResponse}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        param = param or field
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = (f"unknown field; the fields are {', '.join(GenerationRequest.model_fields)}")
        elif e.get("type") == "json_invalid":
            msg = "the body is not valid JSON; send a JSON object such as {\"prompt\": \"a red circle\"}"
        elif e.get("type") == "missing":
            msg = "required; add it"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts), param


def _board_status(job_id: str, events: list) -> dict:
    """``GET /v1/jobs/ID`` of a job another server runs, from its events on the job board."""
    kinds = [e["event"] for e in events]
    status = {"done": "done", "error": "failed"}.get(kinds[-1], "running" if "running" in kinds else "queued")
    if kinds[-1] == "error" and events[-1].get("status") in (499, 504):
        status = "cancelled"
    out = {"job_id": job_id, "status": status, "n": events[0].get("n")}
    steps = [e for e in events if e["event"] == "step"]
    if steps:
        out["step"], out["steps"] = steps[-1]["step"], steps[-1]["steps"]
    if kinds[-1] == "done":
        out["images"] = events[-1]["images"]
    elif kinds[-1] == "error":
        out["error"] = {"message": events[-1]["message"], "status": events[-1]["status"]}
    return out


async def _board_stream(board, job_id: str, events: list, poll_s: float = 0.2):
    """The server-sent events of a job another server runs: the board's, polled, until done or error."""
    seen = 0
    while True:
        for event in events:
            yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
            if event["event"] in ("done", "error"):
                return
        seen += len(events)
        await asyncio.sleep(poll_s)
        events = await board.events(job_id, seen)
        if events is None:
            return


def create_app(pipe, settings: ServeSettings, store, model_name: str | None = None, approx_cache=None,
               job_board=None) -> FastAPI:
    """The app around a loaded pipeline; ``approx_cache``: an object with NIRVANA's interface
    (``generate(...) -> (result, info)``, ``stats()``), or None (``approx_cache: true`` is 501);
    ``job_board``: where several servers share their jobs' events (``publish(job_id, event)``,
    not blocking; ``await events(job_id, since)``, a list or None), so a job made here can be
    followed through another server and the other way round (``sdinfer serve --ray``)."""
    model_name = model_name or settings.model
    jobs: OrderedDict = OrderedDict()
    holder = {}
    metrics = Metrics(queue_depth=lambda: holder["batcher"].depth if "batcher" in holder else 0,
                      images_stored=store.count,
                      approx_stats=approx_cache.stats if approx_cache is not None else None)
    runner = Runner(pipe, store, model_name, metrics, approx_cache)

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(runner, settings.batch_window_ms / 1000.0, settings.max_batch, settings.queue_size)
        holder["batcher"] = batcher
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)
            runner.close()   # the worker has stopped: take off the feature cache it installed

    app = FastAPI(title="sdinfer", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.metrics, app.state.store, app.state.jobs, app.state.holder = metrics, store, jobs, holder
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key)
    app.add_middleware(RequestMetrics, metrics=metrics)   # outermost: counts the guard's refusals too

    # ---- errors -------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err):
        message, param = _validation_message(err)
        return error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err):
        if err.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}; the API is under /v1 "
                              "(see /docs)", kind="not_found")
        return error(err.status_code, str(err.detail), kind="http_error", headers=getattr(err, "headers", None))

    @app.exception_handler(UserError)
    async def _user_error(request, err):
        return error(400, str(err))

    @app.exception_handler(ApproxCacheUnavailable)
    async def _no_approx(request, err):
        return error(501, "approx_cache is not available on this server: the approximate cache "
                          "(sdinfer.serve.approx_cache) is not installed; send approx_cache: false",
                     kind="not_implemented", param="approx_cache")

    @app.exception_handler(QueueFull)
    async def _full(request, err):
        metrics.rejected.inc()
        return error(503, f"the server is busy: {err}", kind="server_busy",
                     headers={"Retry-After": str(err.retry_after)})

    # ---- generation ---------------------------------------------------------------
    def _submit(body: GenerationRequest):
        job = resolve(body, settings, pipe, model_name, approx_cache is not None)
        if job_board is not None:
            job.listener = lambda event, job_id=job.id: job_board.publish(job_id, event)
        job.attach(asyncio.get_running_loop())
        holder["batcher"].submit(job)
        jobs[job.id] = job
        while len(jobs) > MAX_JOBS_KEPT:
            oldest = next(iter(jobs))
            if not jobs[oldest].future.done():
                break
            jobs.pop(oldest)
        return job

    @app.post("/v1/images/generations", responses={200: {"model": GenerationResponse}, 400: ERRORS,
                                                   501: ERRORS, 503: ERRORS})
    async def generations(body: GenerationRequest, request: Request):
        job = _submit(body)
        try:
            outcomes = await _outcome(job, request)
        except UserError:
            raise
        except JobCancelled as err:
            if err.timed_out:
                return error(504, str(err), kind="timeout")
            return error(499, str(err), kind="cancelled")
        except Exception as err:   # the model failed (out of memory, a bug): a JSON 500, counted, logged
            LOG.error("request failed", exc_info=err)
            return error(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")
        data = []
        for o in outcomes:
            if job.response_format == "b64_json":
                data.append({"b64_json": o.b64(), "revised_prompt": None})
            else:
                data.append({"url": f"{str(request.base_url).rstrip('/')}/v1/images/{o.stored.id}",
                             "revised_prompt": None})
        return {"created": int(time.time()), "data": data, "sdinfer": [o.report for o in outcomes]}

    async def _outcome(job, request: Request):
        """The job's outcomes; a client that goes away (or a request the server's host cancels,
        as Ray Serve does) cancels the job, and so does its deadline."""
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.25)
                if done:
                    return job.future.result()
                if await request.is_disconnected():
                    _cancel(job, "the client disconnected")
                elif job.should_stop() is not None:
                    _cancel(job, None)
        except asyncio.CancelledError:
            _cancel(job, "the request was cancelled")
            raise

    def _cancel(job, reason: str | None) -> None:
        job.cancel(reason or str(job.should_stop()))
        holder["batcher"].discard(job)

    @app.post("/v1/jobs", status_code=202, responses={202: {"model": JobCreated}, 400: ERRORS, 501: ERRORS,
                                                        503: ERRORS})
    async def create_job(body: GenerationRequest):
        job = _submit(body)
        return {"job_id": job.id, "events": f"/v1/jobs/{job.id}/events", "status": f"/v1/jobs/{job.id}"}

    def _job(job_id: str):
        job = jobs.get(job_id) if valid_id(job_id) else None
        if job is None:
            return None, error(404, f"no job {job_id!r} on this server (jobs are kept while the server runs); "
                                    "create one with POST /v1/jobs", param="job_id")
        return job, None

    def _elsewhere(job_id: str) -> bool:
        """A job this server does not hold, to ask the shared job board about."""
        return job_board is not None and valid_id(job_id) and job_id not in jobs

    async def _board_events(job_id: str, wait_s: float = 1.0) -> list | None:
        """The job's events on the board; a job just made through another server may reach the
        board a moment after its id reached the client, so a missing one is asked again for ``wait_s``."""
        end = time.monotonic() + wait_s
        while True:
            events = await job_board.events(job_id, 0)
            if events or time.monotonic() >= end:
                return events
            await asyncio.sleep(0.1)

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str):
        if _elsewhere(job_id):
            events = await _board_events(job_id)
            if events:
                return _board_status(job_id, events)
        job, missing = _job(job_id)
        if missing:
            return missing
        out = {"job_id": job.id, "status": job.status, "n": job.n}
        steps = [e for e in job.events if e["event"] == "step"]
        if steps:
            out["step"], out["steps"] = steps[-1]["step"], steps[-1]["steps"]
        last = job.events[-1]
        if last["event"] == "done":
            out["images"] = last["images"]
        elif last["event"] == "error":
            out["error"] = {"message": last["message"], "status": last["status"]}
        return out

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job, missing = _job(job_id)
        if missing:
            return missing
        if not job.future.done():
            _cancel(job, "cancelled by DELETE /v1/jobs/" + job.id)
        return {"job_id": job.id, "status": job.status}

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        if _elsewhere(job_id):
            first = await _board_events(job_id)
            if first:
                return StreamingResponse(_board_stream(job_board, job_id, first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        job, missing = _job(job_id)
        if missing:
            return missing

        async def stream():
            async for event in job.follow():
                yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- the store ----------------------------------------------------------------
    @app.get("/v1/images")
    def list_images(limit: int = 50, before: str | None = None):
        if not 1 <= limit <= MAX_LIST:
            return error(400, f"limit must be between 1 and {MAX_LIST}, got {limit}", param="limit")
        if before is not None and not valid_id(before):
            return error(400, f"before {before!r} is not an image id (32 hex digits, as the list gives)",
                         param="before")
        rows = store.list(limit, before)
        data = [{**r.as_dict(), "url": f"/v1/images/{r.id}"} for r in rows]
        return {"data": data, "next_before": rows[-1].id if len(rows) == limit else None}

    @app.get("/v1/images/{image_id}")
    def get_image(image_id: str):
        if not valid_id(image_id):
            return error(400, f"{image_id!r} is not an image id (32 hex digits, as responses give)",
                         param="image_id")
        png = store.read(image_id)
        if png is None:
            return error(404, f"no image {image_id} in the store", param="image_id")
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=31536000, immutable"})

    # ---- the server ---------------------------------------------------------------
    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "model": model_name, "queue_depth": holder["batcher"].depth if "batcher" in holder else 0}

    @app.get("/metrics")
    def metrics_text():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/config")
    def config():
        from ..samplers import SAMPLERS

        return {"model": model_name, "sizes": [f"{s}x{s}" for s in supported_sizes(pipe)],
                "size": f"{pipe.model.native_size}x{pipe.model.native_size}",
                "defaults": {"sampler": settings.sampler, "steps": settings.steps,
                             "guidance_scale": settings.guidance_scale, "accelerate": settings.accelerate},
                "samplers": sorted(SAMPLERS), "max_n": settings.max_n, "approx_cache": approx_cache is not None}

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(PAGE / "index.html", media_type="text/html")

    app.mount("/page", StaticFiles(directory=PAGE), name="page")
    return app
