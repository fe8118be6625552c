"""What the worker thread does with a batch: install the batch's feature cache (kept installed
while the next batches ask for the same), run the pipeline once with every job's prompt and
seeds (or, with the approximate cache, one image at a time through it), publish per-step
progress, store each image with its parameters and hand each job its results.  At each step
the batch stops (``JobCancelled`` out of the pipeline) when every job in it was cancelled or
ran past its deadline; a cancelled job in a batch that goes on gets no image stored."""

from __future__ import annotations

import base64

from .. import __version__
from ..errors import UserError


class Runner:
    def __init__(self, pipe, store, model_name: str, metrics=None, approx_cache=None):
        self.pipe, self.store, self.model_name = pipe, store, model_name
        self.metrics, self.approx_cache = metrics, approx_cache
        self._installed_spec, self._handle = None, None

    def _set_accelerate(self, spec: str | None) -> None:
        if spec == self._installed_spec:
            return
        if self._handle is not None:
            self._handle.remove()
            self._handle, self._installed_spec = None, None
        if spec:
            from ..accelerate import accelerate

            try:
                self._handle = accelerate(self.pipe, spec)
            except ValueError as err:   # UserError included: the cache does not fit this model
                raise UserError(f"accelerate {spec!r}: {err}") from None
            self._installed_spec = spec

    def close(self) -> None:
        self._set_accelerate(None)

    def __call__(self, jobs: list) -> None:
        first = jobs[0]
        self._set_accelerate(first.accelerate)
        for job in jobs:
            job.publish({"event": "running", "job_id": job.id, "batch_size": sum(j.n for j in jobs)})
        if first.approx_cache:
            rows = self._approx(jobs)
        else:
            rows = self._batched(jobs)
        if self.metrics is not None:
            self.metrics.batch_done(sum(j.n for j in jobs))
        at = 0
        for job in jobs:
            if job.should_stop() is not None:   # cancelled while its batch ran: nothing kept
                at += job.n
                job.fail(job.should_stop())
                continue
            outcomes = [Outcome.make(self, job, k, *rows[at + k]) for k in range(job.n)]
            at += job.n
            job.finish(outcomes, {"images": [o.public() for o in outcomes]})

    def _progress(self, jobs, steps):
        total = steps if isinstance(steps, int) else None

        def callback(i, x):
            stops = [job.should_stop() for job in jobs]
            if all(stops):
                raise stops[0]
            for job in jobs:
                job.publish({"event": "step", "job_id": job.id, "step": i + 1, "steps": total})
        return callback

    def _batched(self, jobs) -> list:
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        seeds = [s for job in jobs for s in job.seeds]
        config = jobs[0].config
        result = self.pipe(prompts, seeds=seeds, config=config, callback=self._progress(jobs, config.steps))
        steps = result.params["steps"]
        info = {"hit": False, "similarity": None, "skipped_steps": 0, "source_id": None}
        return [(result.images[k], result.params, steps[k] if isinstance(steps, list) else steps, info,
                 len(prompts), result.seconds, result.nfe) for k in range(len(prompts))]

    def _approx(self, jobs) -> list:
        """The batch through the approximate cache: its requests that resume at the same step run
        as one pipeline call; each call's progress goes to the jobs in it."""
        config = jobs[0].config
        extra = {}
        if config.spacing is not None:
            extra["spacing"] = config.spacing
        if config.analytic_first_step:
            extra["analytic_first_step"] = True
        owners = [job for job in jobs for _ in job.seeds]

        def progress(i, x, members):
            in_call = {id(owners[m]): owners[m] for m in members}   # jobs are not hashable
            self._progress(list(in_call.values()), config.steps)(i, x)

        out = self.approx_cache.generate_batch(
            [job.prompt for job in owners], [s for job in jobs for s in job.seeds], steps=config.steps,
            sampler=config.sampler, guidance_scale=config.guidance_scale, size=config.size, callback=progress, **extra)
        rows = []
        for result, b, info in out:
            skipped = int(info.get("skipped_steps") or 0)
            rows.append((result.images[b], result.params, int(result.params.get("steps", config.steps)) - skipped,
                         info, len(result.images), result.seconds, result.nfe))
        return rows


class Outcome:
    """One stored image and its report."""

    def __init__(self, stored, report: dict):
        self.stored, self.report = stored, report

    @classmethod
    def make(cls, runner, job, index, image, params, steps_run, info, batch_size, seconds, nfe):
        seed = job.seeds[index]
        size = f"{image.width}x{image.height}"
        report = {"seed": seed, "steps": int(steps_run), "steps_skipped": int(info.get("skipped_steps") or 0),
                  "cache_hit": bool(info.get("hit")), "similarity": info.get("similarity"),
                  "source_id": info.get("source_id"), "batch_size": batch_size, "seconds": round(seconds, 4),
                  "nfe": int(nfe), "sampler": params.get("sampler", job.config.sampler),
                  "guidance_scale": float(job.config.guidance_scale), "size": size, "accelerate": job.accelerate}
        stored_params = {"model": runner.model_name, **report, "user": job.user, "job_id": job.id,
                         "approx_cache": job.approx_cache}
        for key in ("spacing", "analytic_first_step", "auto", "final"):
            if key in params:
                stored_params[key] = params[key]
        meta = {"prompt": job.prompt, "model": runner.model_name, "sampler": stored_params["sampler"],
                "steps": report["steps"], "cfg": report["guidance_scale"], "seed": seed, "size": image.width,
                "software": f"sdinfer {__version__}"}
        meta["parameters"] = ", ".join(f"{k}: {v}" for k, v in meta.items())
        stored = runner.store.add(image, job.prompt, stored_params, metadata=meta)
        if runner.metrics is not None:
            runner.metrics.image_stored()
        return cls(stored, {"id": stored.id, **report})

    def public(self) -> dict:
        return {"id": self.stored.id, "url": f"/v1/images/{self.stored.id}", "prompt": self.stored.prompt,
                "report": self.report}

    def b64(self) -> str:
        return base64.b64encode(self.stored.png).decode("ascii")

