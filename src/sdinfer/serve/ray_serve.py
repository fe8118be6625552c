"""``sdinfer serve --ray``: the same app (``app.py``) on N replicas under Ray Serve, with the image
store, the approximate cache's memory and the jobs' events shared through one leader actor
(``leader.py``).

- Ray: a local cluster started here (``ray.init``: max(CPUs, N) logical CPUs, no dashboard), or
  a running one joined with ``--ray-address`` (``ray start --head`` on the head node,
  ``ray start --address HEAD:6379`` on the others, sdinfer and the model installed on each).
- The leader: ``ray.remote(Leader)``, named ``sdinfer-leader`` in the namespace ``sdinfer``,
  pinned to the node that runs ``sdinfer serve --ray`` (whose disk holds ``--store``), no CPU
  reserved, one call at a time.  It dies with this process.
- The replicas: one Serve deployment of ``Replica``: each loads the pipeline, finds the leader
  by name and builds ``create_app`` with proxies to it (``shared.py``: ``RemoteStore``,
  ``RemoteMemory``, ``RemoteJobBoard`` over an ``ActorLink``); Serve runs the app's lifespan (its
  batcher) on the replica.  Each reserves the cluster's CPUs / N (torch uses as many threads),
  and with ``--device cuda`` its GPUs / N; each response says which replica
  answered in ``X-Sdinfer-Replica``.  Serve's HTTP proxy listens on ``--host``/``--port`` and
  routes each request to the replica with the fewer requests in flight of two.
- Images and latents travel through Ray's object store: a replica encodes the PNG and sends its
  bytes; a cache hit receives its latent (a CPU tensor)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import ray
from ray import serve

from .shared import ActorLink, RemoteJobBoard, RemoteMemory, RemoteStore

NAMESPACE = "sdinfer"
LEADER = "sdinfer-leader"
APP = "sdinfer"
REPLICA_HEADER = "X-Sdinfer-Replica"


class ReplicaHeader:
    """ASGI middleware: every response names the replica that made it."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.lower().encode(), self.value)]}
            await send(message)
        return await self.app(scope, receive, named)


# ---- the deployment ------------------------------------------------------------------
@serve.ingress()
class Replica:
    """One replica: its own pipeline, queue and batcher; the store, cache memory and job board
    are the leader's."""

    def __init__(self, model: dict, settings, threads: int, approx_budget: int | None):
        import torch

        from ..cli.options import load_pipeline

        torch.set_num_threads(max(1, threads))
        self.settings = settings
        self.pipe = load_pipeline(argparse.Namespace(**model))
        self.link = ActorLink(ray.get_actor(LEADER, namespace=NAMESPACE))
        self.store, self.approx = RemoteStore(self.link), None
        if approx_budget is not None and self.link.call("info")["approx_cache"]:
            from .approx_cache import ApproxCache, ApproxCacheConfig

            config = ApproxCacheConfig(directory=self.store.folder / "approx_cache", byte_budget=approx_budget)
            self.approx = ApproxCache(config, self.pipe, memory=RemoteMemory(self.link))
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        from .app import create_app

        app = create_app(self.pipe, self.settings, self.store, model_name=self.settings.model,
                         approx_cache=self.approx, job_board=RemoteJobBoard(self.link))
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app


# ---- the driver ----------------------------------------------------------------------
def start_leader(folder: Path, approx_budget: int | None):
    """The leader actor, pinned to this node (whose disk holds the store folder)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..errors import UserError
    from .leader import Leader

    try:
        ray.get_actor(LEADER, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise UserError(f"another sdinfer serve --ray runs on this Ray cluster (actor {LEADER} in namespace "
                        f"{NAMESPACE}); stop it first, or start another cluster")
    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(Leader).options(
        name=LEADER, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
    leader = actor.remote(str(folder), approx_budget)
    ray.get(leader.info.remote())     # opened (an error surfaces here)
    return leader


def _share(total: float, replicas: int) -> float:
    """A replica's share of ``total`` units: whole units where there are enough, else a fraction."""
    return total // replicas if total >= replicas else total / replicas


def run(args, settings, approx_budget: int | None, say=lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    """Serve ``settings`` on ``args.replicas`` replicas until SIGINT or SIGTERM."""
    from ..errors import UserError
    from .store import ImageStore, default_store_dir

    folder = Path(default_store_dir() if args.store is None else args.store).expanduser().resolve()
    probe = ImageStore(folder)        # a UserError for an unusable folder before Ray starts
    count, fixed = probe.count(), ", ".join(f"{v} {k}" for k, v in probe.repaired.items() if v)
    probe.close()
    replicas = args.replicas
    local = args.ray_address is None
    try:
        if local:
            ray.init(num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False, namespace=NAMESPACE,
                     logging_level="WARNING")
        else:
            ray.init(address=args.ray_address, namespace=NAMESPACE, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as err:
        hint = ("start one with `ray start --head` and pass --ray-address HOST:6379 (a cluster with token "
                "authentication also needs RAY_AUTH_MODE=token here, its token in ~/.ray/auth_token or "
                "RAY_AUTH_TOKEN), or leave --ray-address out for a local one")
        raise UserError(f"cannot start or join a Ray cluster ({args.ray_address or 'local'}): {err}; {hint}") from None
    stop = threading.Event()
    try:
        resources = ray.cluster_resources()
        per = _share(float(resources.get("CPU", 1)), replicas)
        options, model = {"num_cpus": per}, {"model": args.model, "device": args.device, "dtype": args.dtype}
        if str(args.device).startswith("cuda"):
            gpus = float(resources.get("GPU", 0))
            if gpus <= 0:
                raise UserError(f"--device {args.device}: the Ray cluster has no GPU; start its nodes on GPU machines "
                                "or serve on --device cpu")
            # each replica reserves its share; Ray picks the GPUs and shows them to it as cuda:0...
            options["num_gpus"], model["device"] = _share(gpus, replicas), "cuda"
        leader = start_leader(folder, approx_budget)   # held until the end: the actor lives while a handle does
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=quiet)
        deployment = serve.deployment(
            Replica, name="sdinfer", num_replicas=replicas, ray_actor_options=options,
            max_ongoing_requests=settings.queue_size + settings.max_batch + 32, logging_config=quiet)
        try:
            serve.run(deployment.bind(model, settings, int(per) or 1, approx_budget), name=APP, route_prefix="/",
                      blocking=False)
        except RuntimeError as err:   # a replica failed to start (its traceback is in the log above)
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise UserError(f"the replicas did not start: {lines[-1] if lines else err}; see the replica's "
                            "error above") from None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        say(f"sdinfer serve --ray: model {args.model} on {args.device}, {replicas} replicas of {per:g} CPUs, "
            f"store {folder} on the leader ({count} images{'; removed ' + fixed if fixed else ''}); "
            f"http://{args.host}:{args.port}/")
        while not stop.wait(0.5):
            pass
    finally:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP)
        finally:
            ray.shutdown()
    return 0
