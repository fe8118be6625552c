"""``sdinfer serve``: one model behind an HTTP API and a web page (``sdinfer.serve``).  The flags
set the server's defaults; each request may override the sampler, steps, guidance scale, seed
and feature cache.  Needs the ``serve`` extra."""

from __future__ import annotations

import sys

from ..errors import UserError
from .options import add_device_options, steps_or_auto, whole_number


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-style API, web page, image store)",
                       description="Load one model and serve it: POST /v1/images/generations (OpenAI Images "
                                   "API shape), jobs with per-step progress (server-sent events), the image "
                                   "store and its gallery, /healthz, /metrics, and a web page at /.")
    s.add_argument("--model", default="default",
                   help="default | unet | dit | unet-64 | dit-64 | PATH to a diffusers pipeline folder "
                        "(default: default, the shipped UNet)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=whole_number, default=8000, help="port to listen on (default: 8000)")
    add_device_options(s)
    s.add_argument("--sampler", default="ddim", help="default sampler of requests that name none (default: ddim)")
    s.add_argument("--steps", type=steps_or_auto, default=50, help="default denoising steps (default: 50)")
    s.add_argument("--cfg", type=float, default=4.0, help="default guidance scale (default: 4)")
    s.add_argument("--accelerate", default=None, metavar="SPEC",
                   help="default feature cache, e.g. deepcache:interval=3 (a request's accelerate overrides it; "
                        "'none' turns it off)")
    s.add_argument("--preset", default=None, metavar="FILE",
                   help="a preset of sdinfer tune as the defaults (model, sampler, steps, grid, first step, cache, "
                        "cfg); a flag given explicitly overrides the preset's value")
    s.add_argument("--store", default=None, metavar="DIR",
                   help="folder of the image store (SQLite and PNG files; default: ~/.cache/sdinfer/serve)")
    s.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long a request waits for compatible ones to share its pipeline call (default: 20)")
    s.add_argument("--max-batch", type=whole_number, default=8, help="most images in one pipeline call (default: 8)")
    s.add_argument("--queue-size", type=whole_number, default=64,
                   help="most requests waiting; more are answered 503 with Retry-After (default: 64)")
    s.add_argument("--max-n", type=whole_number, default=8, help="most images one request may ask for (default: 8)")
    s.add_argument("--approx-cache-mb", type=float, default=512.0,
                   help="byte budget of the approximate cache, in MiB (default: 512)")
    s.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a request still queued or running after this long is cancelled and answered 504 "
                        "(default: 600)")
    s.add_argument("--max-body-kb", type=float, default=64.0,
                   help="largest request body accepted, in KiB; larger ones are answered 413 (default: 64)")
    s.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="a file holding the API key that clients send as 'Authorization: Bearer KEY' "
                        "(or set SDINFER_API_KEY); required when --host is not a loopback address")
    s.add_argument("--ray", action="store_true",
                   help="run under Ray Serve: --replicas copies of the app, the store, the approximate cache and the "
                        "jobs shared through one leader (needs the ray extra)")
    s.add_argument("--replicas", type=whole_number, default=None,
                   help="with --ray: how many replicas, each with its own copy of the model (default: 2)")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray: join a running Ray cluster (e.g. HOST:6379 of `ray start --head`; default: "
                        "start a local one on this machine)")
    s.set_defaults(func=run)


def _serve_imports():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise UserError(f"sdinfer serve needs the serve extra ({err.name} is missing); install it with "
                        "pip install -e \".[serve]\" (or pip install \"sdinfer[serve]\")") from None
    return uvicorn


def settings_of(args, say=lambda message: print(message, file=sys.stderr)):
    """The server's defaults from the flags and ``--preset`` (an explicit flag wins), checked
    before the model loads."""
    from ..generation_config import GenerationConfig
    from ..serve.jobs import ServeSettings
    from .options import PRESET_FLAGS, apply_preset

    args.spacing, args.analytic_first_step = None, False
    apply_preset(args, list(PRESET_FLAGS), say)

    if args.max_batch < 1 or args.queue_size < 1 or args.max_n < 1 or args.batch_window_ms < 0:
        raise UserError("--max-batch, --queue-size and --max-n must be >= 1 and --batch-window-ms >= 0")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.request_timeout > 0 or not args.max_body_kb > 0:
        raise UserError("--request-timeout and --max-body-kb must be positive")
    api_key = api_key_of(args)
    spacing, afs = args.spacing, bool(args.analytic_first_step)
    GenerationConfig(steps=args.steps, sampler=args.sampler, guidance_scale=args.cfg, spacing=spacing,
                     analytic_first_step=afs)   # the defaults checked before the model loads
    if args.accelerate:
        from ..serve.jobs import check_accelerate

        check_accelerate(args.accelerate)
    return ServeSettings(model=args.model, sampler=args.sampler, steps=args.steps, guidance_scale=args.cfg,
                         accelerate=args.accelerate or None, spacing=spacing, analytic_first_step=afs,
                         batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
                         queue_size=args.queue_size, max_n=args.max_n, request_timeout_s=args.request_timeout,
                         max_body_bytes=int(args.max_body_kb * 1024), api_key=api_key)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key_of(args, environ=None) -> str | None:
    """The API key from ``--api-key-file`` or ``SDINFER_API_KEY``; refuses a server that
    listens beyond this machine without one."""
    import os
    from pathlib import Path

    environ = os.environ if environ is None else environ
    key = None
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise UserError(f"cannot read --api-key-file {args.api_key_file}: {err.strerror or err}") from None
        if not key:
            raise UserError(f"--api-key-file {args.api_key_file} is empty; write the key into it")
    elif environ.get("SDINFER_API_KEY", "").strip():
        key = environ["SDINFER_API_KEY"].strip()
    if key is not None and (len(key) < 16 or any(c.isspace() for c in key)):
        raise UserError("the API key must be at least 16 characters without spaces; make one with "
                        "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if key is None and not is_loopback(args.host):
        raise UserError(f"--host {args.host} lets other machines reach the server; give it an API key "
                        "(SDINFER_API_KEY=KEY or --api-key-file FILE; clients send Authorization: Bearer KEY) "
                        "or listen on 127.0.0.1")
    return key


def make_approx_cache(pipe, folder, megabytes: float):
    """NIRVANA's approximate cache where its module is installed; None otherwise."""
    try:
        from ..serve.approx_cache import ApproxCache, ApproxCacheConfig
    except ImportError:
        return None
    return ApproxCache(ApproxCacheConfig(directory=folder, byte_budget=int(megabytes * 2**20)), pipe)


def _run_ray(args, settings) -> int:
    try:
        from ..serve import ray_serve
    except ImportError as err:
        if not (err.name or "").startswith("ray"):
            raise
        raise UserError(f"sdinfer serve --ray needs Ray Serve ({err.name} is missing); install the ray extra: "
                        "pip install 'sdinfer[ray]'") from None
    from ..devices import resolve_device, resolve_dtype

    resolve_dtype(args.dtype)         # a bad --dtype before Ray starts; --device too where the replicas run here
    if args.ray_address is None:
        from ..models.loading import resolve

        resolve_device(args.device)
        resolve(args.model)           # an unknown model before the replicas try to load it
    return ray_serve.run(args, settings, int(args.approx_cache_mb * 2**20))


def run(args) -> int:
    from .options import load_pipeline

    uvicorn = _serve_imports()
    settings = settings_of(args)
    if not getattr(args, "ray", False):
        if getattr(args, "replicas", None) is not None or getattr(args, "ray_address", None) is not None:
            raise UserError("--replicas and --ray-address run under Ray Serve; add --ray")
    else:
        args.replicas = 2 if args.replicas is None else args.replicas
        if args.replicas < 1:
            raise UserError(f"--replicas must be at least 1, got {args.replicas}")
        return _run_ray(args, settings)
    from ..serve.app import create_app
    from ..serve.store import ImageStore, default_store_dir

    folder = default_store_dir() if args.store is None else args.store
    store = ImageStore(folder)
    pipe = load_pipeline(args)
    approx = make_approx_cache(pipe, store.folder / "approx_cache", args.approx_cache_mb)
    app = create_app(pipe, settings, store, model_name=args.model, approx_cache=approx)
    fixed = ", ".join(f"{v} {k}" for k, v in store.repaired.items() if v)
    print(f"sdinfer serve: model {args.model} on {args.device}, store {store.folder} "
          f"({store.count()} images{'; removed ' + fixed if fixed else ''}); "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=30)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}; choose another --port") from None
    return 0
