"""Caches under the exact parallel strategies, on 2 gloo ranks (``parallel_worker.py caches``):
each cached parallel run against the same cache on one device, and the combinations refused."""

from pathlib import Path

import pytest

from parallel_helpers import run_workers

WORKER = Path(__file__).parent / "parallel_worker.py"
CASES = ["dit/ulysses/fbcache:threshold=0.12", "dit/ring/teacache:threshold=0.2", "dit/cfg/dbcache:threshold=0.12",
         "dit/ulysses/fora:interval=3", "unet/cfg/teacache:threshold=0.2", "dit/cfg/ditfastattn:window_size=64",
         "unet/cfg/linfusion"]


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    return run_workers(WORKER, "caches", tmp_path_factory.mktemp("parallel-caches") / "findings.json")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_cache_under_a_strategy_equals_that_cache_on_one_device(findings, case):
    """Every rank decides on the whole batch / all tokens, as one device does."""
    assert findings[case]["max_abs_error"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if not any(m in c for m in ("fora", "ditfastattn", "linfusion"))])   # fixed
def test_data_dependent_decisions_are_summed_over_the_ranks(findings, case):
    assert findings[case]["calls"].get("all_reduce", 0) > 0


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [
    ("tgate under cfg", ["tgate cannot run under the cfg parallel strategy", "it takes deepcache, fora"]),
    ("fora under asyncdiff", ["asyncdiff computes with stale activations and takes no cache"]),
    ("strategy after a cache", ["install the parallel strategy first"]),
])
def test_combinations_refused_clearly(findings, case, words):
    message = findings["errors"][case]
    assert message is not None, f"{case}: no error"
    for w in words:
        assert w in message, message
