"""What the replicas of ``sdinfer serve --ray`` hold instead of their own store, approximate-cache
memory and jobs: proxies with the same interfaces, whose every call goes to the one leader
(``leader.py``).  A leader is reached through a *link*: ``ActorLink`` (a Ray actor handle: calls
are ``ray.get(handle.method.remote(...))``, events are sent without waiting, the job board's
reads are awaited on the event loop) or ``LocalLink`` (a ``Leader`` in this process: the same
code paths without Ray, for the tests and one-process use)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .store import StoredImage, encode_png


class LocalLink:
    """A ``Leader`` object in this process."""

    def __init__(self, leader):
        self.leader = leader

    def call(self, name: str, *args):
        return getattr(self.leader, name)(*args)

    def send(self, name: str, *args) -> None:
        getattr(self.leader, name)(*args)

    async def acall(self, name: str, *args):
        return await asyncio.to_thread(self.call, name, *args)


class ActorLink:
    """The leader as a Ray actor (its handle)."""

    def __init__(self, handle):
        self.handle = handle

    def call(self, name: str, *args):
        import ray

        return ray.get(getattr(self.handle, name).remote(*args))

    def send(self, name: str, *args) -> None:
        getattr(self.handle, name).remote(*args)      # not waited for: the caller goes on

    async def acall(self, name: str, *args):
        return await getattr(self.handle, name).remote(*args)   # an ObjectRef is awaitable


class RemoteStore:
    """``ImageStore``'s interface, kept by the leader: the PNG is encoded here, stored there."""

    def __init__(self, link):
        self.link = link
        info = link.call("info")
        self.folder = Path(info["folder"])

    def add(self, image, prompt: str, params: dict, image_id: str | None = None,
            metadata: dict | None = None) -> StoredImage:
        png = encode_png(image, metadata)
        row = self.link.call("add_png", png, prompt, params, image_id)
        return StoredImage(row["id"], row["created"], row["prompt"], row["params"], png)

    def read(self, image_id: str) -> bytes | None:
        return self.link.call("read", image_id)

    def get(self, image_id: str) -> StoredImage | None:
        row = self.link.call("get", image_id)
        return None if row is None else StoredImage(**row)

    def list(self, limit: int = 50, before: str | None = None) -> list[StoredImage]:
        return [StoredImage(**row) for row in self.link.call("list", limit, before)]

    def count(self) -> int:
        return self.link.call("count")

    def close(self) -> None:
        pass


class RemoteMemory:
    """``approx_memory.ApproxMemory``'s interface, kept by the leader."""

    def __init__(self, link):
        self.link = link

    def lookup(self, settings: str, embedding, steps: int):
        return self.link.call("approx_lookup", settings, embedding, steps)

    def insert(self, prompt: str, settings: str, embedding, kept: dict) -> None:
        self.link.call("approx_insert", prompt, settings, embedding, kept)

    def totals(self) -> tuple[int, int]:
        return tuple(self.link.call("approx_totals"))

    def close(self) -> None:
        pass


class RemoteJobBoard:
    """Every server's jobs' events, kept by the leader (``create_app``'s ``job_board``)."""

    def __init__(self, link):
        self.link = link

    def publish(self, job_id: str, event: dict) -> None:
        self.link.send("job_event", job_id, event)

    async def events(self, job_id: str, since: int = 0) -> list | None:
        return await self.link.acall("job_events", job_id, since)
