"""The request and response bodies of the server (pydantic v2).

``GenerationRequest`` is the OpenAI Images API's ``POST /v1/images/generations`` body
(``prompt``, ``n``, ``size`` as ``"WxH"``, ``response_format``, ``user``, and ``model``, which
must name the served model when given) plus sdinfer's fields (``steps``, ``sampler``,
``guidance_scale``, ``seed``, ``accelerate``, ``approx_cache``); a field left out takes the
server's default.  Checks that need no model are here; what depends on the model (its sizes,
its vocabulary, whether a sampler spec parses) is checked by ``jobs.resolve``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 1000
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1 - 10**6   # the pipeline draws stochastic samplers' noise from seed + 10**6


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what to draw, e.g. 'a red circle in the top left'")
    n: int = Field(1, description="images to generate (seeds seed, seed+1, ...)")
    size: str | None = Field(None, description="'WxH', one of the sizes the model supports")
    response_format: Literal["b64_json", "url"] = "url"
    user: str | None = Field(None, max_length=256)
    model: str | None = Field(None, description="the served model's name (optional)")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    sampler: str | None = Field(None, max_length=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    accelerate: str | None = Field(None, max_length=200,
                                   description="feature cache spec, e.g. deepcache:interval=3; 'none' for none")
    approx_cache: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty; describe the image, e.g. 'a red circle in the top left'")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt has {len(value)} characters, more than {MAX_PROMPT_CHARS}; shorten it")
        return value.strip()

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None:
            return None
        w, sep, h = value.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise ValueError(f"size {value!r} must look like '32x32' (width x height in pixels)")
        if w != h:
            raise ValueError(f"size {value!r} is not square; the models draw square images, e.g. '{w}x{w}'")
        return f"{int(w)}x{int(h)}"


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImageReport(BaseModel):
    """What was done for one image."""

    id: str
    seed: int
    steps: int = Field(description="denoising steps run")
    steps_skipped: int = Field(description="steps not run (approximate cache: the cached latent's)")
    cache_hit: bool
    similarity: float | None
    source_id: str | None = None
    batch_size: int = Field(description="images in the pipeline call this one ran in")
    seconds: float = Field(description="the pipeline call's wall time")
    nfe: int
    sampler: str
    guidance_scale: float
    size: str
    accelerate: str | None


class GenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    sdinfer: list[ImageReport]


class JobCreated(BaseModel):
    job_id: str
    events: str = Field(description="URL of the job's server-sent events")
    status: str = Field(description="URL of the job's status")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
