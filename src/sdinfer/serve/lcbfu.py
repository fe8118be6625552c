"""LCBFU eviction ("Least Computationally Beneficial and Frequently Used"), the policy of
NIRVANA's approximate cache (Agarwal et al., "Approximate Caching for Efficiently Serving
Diffusion Models", NSDI 2024).

Each cached latent saves ``steps_saved`` (its K) denoising steps whenever it serves a request;
its benefit is K x its frequency of use.  Here the frequency is ``uses``: the run that made it
counts once and every request it served once more, so a latent that never served yet ranks by
its K alone (a new entry is not the first to go merely for being new).  The latents with the
lowest benefit are evicted first; among equal benefits the oldest (lowest ``seq``, the order
of insertion) first.  Pure Python, no I/O: the store supplies the candidates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cached:
    """One cached latent as the policy sees it."""

    key: object          # the store's id of the latent
    steps_saved: int     # K: the steps a request resumed from it skips
    uses: int            # 1 (the run that made it) + the requests it served
    seq: int             # insertion order: lower is older
    nbytes: int


def benefit(item: Cached) -> int:
    """Computational benefit x frequency of use."""
    return item.steps_saved * item.uses


def eviction_order(items: list[Cached]) -> list[Cached]:
    """Lowest benefit first; ties: oldest first."""
    return sorted(items, key=lambda c: (benefit(c), c.seq))


def victims(items: list[Cached], budget: int) -> list[Cached]:
    """The latents to evict, in order, so that the rest hold at most ``budget`` bytes."""
    if budget < 0:
        raise ValueError(f"byte budget {budget} is negative")
    held = sum(c.nbytes for c in items)
    out = []
    for c in eviction_order(items):
        if held <= budget:
            break
        out.append(c)
        held -= c.nbytes
    return out
