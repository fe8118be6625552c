"""NIRVANA's approximate cache (sdinfer.serve.approx_cache) and Pipeline's start=(k, latents)."""

import threading

import pytest
import torch

import sdinfer
from sdinfer.errors import UserError
from sdinfer.eval.metrics import psnr
from sdinfer.serve.approx_cache import (ApproxCache, ApproxCacheConfig, candidate_steps, choose_step,
                                        cosine)
from sdinfer.serve.lcbfu import Cached, eviction_order, victims

STEPS = 10
# thresholds for the logic tests (the calibrated defaults are tested on their own below)
THRESHOLDS = (0.80, 0.85, 0.90, 0.95, 0.99)
BASE = "a red circle in the top left"
NEAR = "a red square in the top left"             # one attribute changed (kind)
FAR = "a green square in the center"            # unrelated (as long as BASE: files of one size)
SECOND_FAR = "a blue triangle in the bottom right"   # unrelated to all three


def make_cache(pipe, directory, budget=10**7, thresholds=THRESHOLDS):
    return ApproxCache(ApproxCacheConfig(directory=directory, byte_budget=budget, thresholds=thresholds), pipe)


def latents_at(pipe, prompt, k, **kw):
    seen = {}
    full = pipe(prompt, callback=lambda i, x: seen.__setitem__(i, x.clone()), **kw)
    return full, seen[k - 1]


# ---- LCBFU, pure ------------------------------------------------------------------
def test_lcbfu_orders_by_benefit_then_age():
    items = [Cached("a", steps_saved=25, uses=1, seq=0, nbytes=10),   # benefit 25
             Cached("b", steps_saved=5, uses=3, seq=1, nbytes=10),    # 15
             Cached("c", steps_saved=5, uses=1, seq=2, nbytes=10),    # 5
             Cached("d", steps_saved=10, uses=2, seq=3, nbytes=10),   # 20
             Cached("e", steps_saved=15, uses=1, seq=4, nbytes=10),   # 15, newer than b
             Cached("f", steps_saved=1, uses=5, seq=5, nbytes=10)]    # 5, newer than c
    assert [c.key for c in eviction_order(items)] == ["c", "f", "b", "e", "d", "a"]
    assert [c.key for c in victims(items, budget=35)] == ["c", "f", "b"]
    assert victims(items, budget=60) == []
    assert [c.key for c in victims(items, budget=0)] == ["c", "f", "b", "e", "d", "a"]
    with pytest.raises(ValueError):
        victims(items, budget=-1)


def test_candidate_steps_and_choice():
    assert candidate_steps(50, (0.1, 0.2, 0.3, 0.4, 0.5)) == [5, 10, 15, 20, 25]
    assert candidate_steps(10, (0.1, 0.2, 0.3, 0.4, 0.5)) == [1, 2, 3, 4, 5]
    assert candidate_steps(4, (0.1, 0.2, 0.3, 0.4, 0.5)) == [None, 1, None, 2, None]
    cfg = ApproxCacheConfig(directory="unused", thresholds=THRESHOLDS)
    assert choose_step(0.5, 10, cfg, {1, 2, 3, 4, 5}) == 0
    assert choose_step(0.87, 10, cfg, {1, 2, 3, 4, 5}) == 2
    assert choose_step(0.999, 10, cfg, {1, 2, 3, 4, 5}) == 5
    assert choose_step(0.999, 10, cfg, {1, 2, 3}) == 3       # evicted latents are not chosen
    with pytest.raises(UserError, match="must not decrease"):
        ApproxCacheConfig(directory="unused", thresholds=(0.9, 0.8, 0.9, 0.9, 0.9))
    with pytest.raises(UserError, match="thresholds for"):
        ApproxCacheConfig(directory="unused", thresholds=(0.9,))


# ---- Pipeline(start=) --------------------------------------------------------------
def test_resume_at_step_k_equals_the_full_run(unet_pipe):
    full, x4 = latents_at(unet_pipe, BASE, 4, steps=STEPS, seed=3)
    seen = []
    resumed = unet_pipe(BASE, steps=STEPS, seed=99, start=(4, x4), callback=lambda i, x: seen.append(i))
    assert seen == list(range(4, STEPS))
    assert resumed.nfe == STEPS - 4 and resumed.params["start_step"] == 4
    assert torch.allclose(resumed.pixels, full.pixels, atol=1e-5)    # ddim: no history, the seed unused


@pytest.fixture(scope="module")
def accurate(unet_pipe):
    """BASE at seed 3 solved accurately (DPM-Solver++(2M), 100 steps)."""
    return unet_pipe(BASE, steps=100, seed=3, sampler="dpm-solver++").pixels


@pytest.mark.parametrize("sampler", ["dpm-solver++", "dpm-solver++-3m", "dpm-solver-singlestep:order=3",
                                     "unipc", "plms", "ddim:0-5,dpm-solver++:5-10"])
def test_multistep_samplers_restart_their_history(unet_pipe, accurate, sampler):
    full, x = latents_at(unet_pipe, BASE, 4, steps=STEPS, seed=3, sampler=sampler)
    resumed = unet_pipe(BASE, steps=STEPS, seed=3, sampler=sampler, start=(4, x))
    assert resumed.nfe == STEPS - 4 + (sampler == "plms")    # PLMS's first step takes two evaluations
    if sampler.startswith("ddim:"):      # resumed inside the schedule's DDIM range: no history to lose
        assert torch.equal(resumed.pixels, full.pixels)
        return
    assert not torch.equal(resumed.pixels, full.pixels)      # lower orders after K: another path ...
    # ... that ends no farther from the accurate solution than the full run (singlestep order 3 and
    # PLMS at 10 steps are far from it on this model: 12-18 dB; their restart lands nearer)
    assert psnr(resumed.pixels, accurate) > min(psnr(full.pixels, accurate), 30.0) - 1.0


def test_resume_under_a_feature_cache(unet_pipe):
    _, x = latents_at(unet_pipe, BASE, 5, steps=STEPS, seed=3)
    handle = sdinfer.accelerate(unet_pipe, "deepcache:interval=3")
    try:
        steps_seen = []
        from sdinfer.context import current_step

        def spy(_module, _args):
            steps_seen.append(current_step().step_index)
        hook = unet_pipe.model.denoiser.register_forward_pre_hook(spy)
        try:
            cached = unet_pipe(BASE, steps=STEPS, seed=3, start=(5, x))
        finally:
            hook.remove()
    finally:
        handle.remove()
    plain = unet_pipe(BASE, steps=STEPS, seed=3, start=(5, x))
    assert steps_seen == list(range(5, STEPS))
    assert cached.nfe == STEPS - 5
    assert 20 < psnr(cached.pixels, plain.pixels) < float("inf")  # computed steps
    # DeepCache computes fully on the first step it sees (nothing kept yet), so it reused blocks after


def test_start_validation(unet_pipe):
    _, x = latents_at(unet_pipe, BASE, 2, steps=4, seed=0)
    for k in (4, -1, 10):
        with pytest.raises(UserError, match=f"start step {k} is outside this run of 4 steps"):
            unet_pipe(BASE, steps=4, start=(k, x))
    for k in ("2", 2.0, True):
        with pytest.raises(UserError, match="outside this run"):
            unet_pipe(BASE, steps=4, start=(k, x))
    with pytest.raises(UserError, match=r"start latents have shape \(1, 3, 16, 16\).*needs \(1, 3, 32, 32\)"):
        unet_pipe(BASE, steps=4, start=(2, x[..., :16, :16]))
    with pytest.raises(UserError, match=r"2 prompt\(s\)"):
        unet_pipe([BASE, FAR], steps=4, start=(2, torch.cat([x, x, x])))
    with pytest.raises(UserError, match="pair"):
        unet_pipe(BASE, steps=4, start=x)
    with pytest.raises(UserError, match="torch tensor"):
        unet_pipe(BASE, steps=4, start=(2, x.numpy()))
    with pytest.raises(UserError, match="cannot resume"):
        unet_pipe(BASE, steps=4, sampler="paradigms", start=(2, x))
    both = unet_pipe([BASE, NEAR], steps=4, start=(2, x))          # one latent, broadcast
    assert both.pixels.shape[0] == 2 and both.nfe == 2


# ---- the cache ---------------------------------------------------------------------
def test_near_duplicate_hits_and_equals_a_direct_resume(unet_pipe, tmp_path):
    sim = cosine(unet_pipe, BASE, NEAR)
    cache = make_cache(unet_pipe, tmp_path)
    _, info = cache.generate(BASE, seed=1, steps=STEPS, sampler="ddim", guidance_scale=4.0, size=None)
    assert info == {"hit": False, "similarity": None, "skipped_steps": 0, "source_id": None}
    result, info = cache.generate(NEAR, seed=7, steps=STEPS, sampler="ddim", guidance_scale=4.0, size=None)
    k = choose_step(sim, STEPS, cache.config, {1, 2, 3, 4, 5})
    assert k > 0 and info["hit"] and info["skipped_steps"] == k
    assert info["similarity"] == pytest.approx(sim, abs=1e-5) and isinstance(info["source_id"], str)
    assert result.nfe == STEPS - k
    _, stored = latents_at(unet_pipe, BASE, k, steps=STEPS, seed=1)
    direct = unet_pipe(NEAR, steps=STEPS, seed=7, start=(k, stored))
    assert torch.equal(result.pixels, direct.pixels)
    # the hit kept its own latents after K (steps it ran under its own prompt): a repeat of it skips the most
    assert cache.stats() == {"hits": 1, "misses": 1, "steps_saved": k, "bytes": cache.stats()["bytes"],
                             "entries": 5 + (5 - k)}
    _, again = cache.generate(NEAR, seed=8, steps=STEPS, sampler="ddim", guidance_scale=4.0, size=None)
    assert again["hit"] and again["skipped_steps"] == 5 and again["source_id"] != info["source_id"]
    cache.close()


def test_a_batch_runs_one_call_per_resume_step_and_equals_the_requests_alone(unet_pipe, tmp_path):
    """generate_batch: a near-duplicate (a hit), an unrelated prompt and a second new prompt (two
    misses, one call) give the images and reports each gives alone on a cache in the same state."""
    calls = []
    batch_cache = make_cache(unet_pipe, tmp_path / "batch")
    alone_cache = make_cache(unet_pipe, tmp_path / "alone")
    for cache in (batch_cache, alone_cache):
        cache.generate(BASE, seed=1, steps=STEPS)
    prompts, seeds = [NEAR, FAR, SECOND_FAR], [7, 8, 9]
    out = batch_cache.generate_batch(prompts, seeds, steps=STEPS,
                                     callback=lambda i, x, members: calls.append((i, tuple(members), x.shape[0])))
    alone = [alone_cache.generate(p, seed=s, steps=STEPS) for p, s in zip(prompts, seeds)]
    for (result, b, info), (single, single_info) in zip(out, alone):
        # a batch of two against one: float32 kernels may round the last bits differently
        assert (result.pixels[b] - single.pixels[0]).abs().max() < 1e-4
        assert (info["hit"], info["skipped_steps"]) == (single_info["hit"], single_info["skipped_steps"])
    assert [o[2]["hit"] for o in out] == [True, False, False] and out[1][0] is out[2][0]
    assert out[0][2]["similarity"] == pytest.approx(alone[0][1]["similarity"], abs=1e-6)
    k = out[0][2]["skipped_steps"]
    assert {m for _, m, _ in calls} == {(0,), (1, 2)}
    assert [i for i, m, _ in calls if m == (0,)] == list(range(k, STEPS))
    assert all(n == len(m) for _, m, n in calls)
    assert batch_cache.stats() == {**alone_cache.stats(), "bytes": batch_cache.stats()["bytes"]}
    with pytest.raises(UserError, match="one seed per prompt"):
        batch_cache.generate_batch([BASE, FAR], [1], steps=STEPS)
    batch_cache.close(), alone_cache.close()


def test_unrelated_prompt_and_other_settings_miss(unet_pipe, tmp_path):
    cache = make_cache(unet_pipe, tmp_path)
    cache.generate(BASE, seed=1, steps=STEPS, sampler="ddim", guidance_scale=4.0, size=None)
    result, info = cache.generate(FAR, seed=1, steps=STEPS, sampler="ddim", guidance_scale=4.0, size=None)
    assert not info["hit"] and info["similarity"] < THRESHOLDS[0] and result.nfe == STEPS
    for other in (dict(steps=8), dict(sampler="dpm-solver++"), dict(guidance_scale=2.0),
                  dict(spacing="leading")):
        args = dict(seed=1, steps=STEPS, sampler="ddim", guidance_scale=4.0, size=None) | other
        result, info = cache.generate(BASE, **args)      # the same prompt, other settings
        assert info == {"hit": False, "similarity": None, "skipped_steps": 0, "source_id": None}, other
        assert result.nfe == args["steps"]
    # a sampler that runs its own loop bypasses the cache: a full run, nothing stored
    before = cache.stats()["entries"]
    _, info = cache.generate(BASE, seed=1, steps=STEPS, sampler="paradigms", guidance_scale=4.0, size=None)
    assert not info["hit"] and cache.stats()["entries"] == before
    cache.close()


def test_eviction_keeps_the_budget_in_lcbfu_order(unet_pipe, tmp_path):
    cache = make_cache(unet_pipe, tmp_path / "probe")
    cache.generate(BASE, seed=1, steps=STEPS)
    one = cache.stats()["bytes"] // 5        # the bytes of one latent file
    cache.close()
    budget = 7 * one
    cache = make_cache(unet_pipe, tmp_path / "cache", budget=budget)
    cache.generate(BASE, seed=1, steps=STEPS)                 # k1..k5 of BASE
    _, hit = cache.generate(NEAR, seed=1, steps=STEPS)       # uses BASE's latent at K
    assert hit["hit"]
    assert hit["skipped_steps"] == 3          # similarity 0.94: THRESHOLDS allow K = 3 of 10
    assert cache.stats()["entries"] == 7      # NEAR's own k4, k5 joined BASE's five
    cache.generate(FAR, seed=1, steps=STEPS)                  # 5 more: 12 files > 7
    s = cache.stats()
    assert s["bytes"] <= budget and s["entries"] == 7
    held = {(r.source, r.step) for r in cache.store.all_latents()}
    base_id, near_id, far_id = sorted({source for source, _ in held})
    # benefit = K x uses: BASE's k3 served once (3 x 2 = 6); the rest have K x 1.  The lowest go,
    # ties oldest first: BASE k1 (1), FAR k1 (1), BASE k2 (2), FAR k2 (2), FAR k3 (3; BASE k3 has 6)
    everything = ({(base_id, k) for k in range(1, 6)} | {(near_id, 4), (near_id, 5)}
                  | {(far_id, k) for k in range(1, 6)})
    assert everything - held == {(base_id, 1), (far_id, 1), (base_id, 2), (far_id, 2), (far_id, 3)}
    # a budget below every latent empties the cache and the index with it
    cache.close()
    cache = make_cache(unet_pipe, tmp_path / "cache", budget=0)
    assert cache.stats()["entries"] == 0 and len(cache.index) == 0
    _, info = cache.generate(BASE, seed=1, steps=STEPS)
    assert not info["hit"] and info["similarity"] is None and cache.stats()["bytes"] == 0
    cache.close()


def test_index_survives_a_restart(unet_pipe, tmp_path):
    cache = make_cache(unet_pipe, tmp_path)
    cache.generate(BASE, seed=1, steps=STEPS)
    cache.close()
    reopened = make_cache(unet_pipe, tmp_path)
    assert reopened.stats()["entries"] == 5
    _, info = reopened.generate(BASE, seed=5, steps=STEPS)
    assert info["hit"] and info["similarity"] == pytest.approx(1.0, abs=1e-5) and info["skipped_steps"] == 5
    reopened.close()
    # a lost index file is rebuilt from SQLite; a half-written latent file (a crash) is dropped
    (tmp_path / "index.faiss").unlink()
    (tmp_path / "latents" / "crashed-k1.safetensors.tmp").write_bytes(b"partial")
    again = make_cache(unet_pipe, tmp_path)
    assert len(again.index) == 1 and not (tmp_path / "latents" / "crashed-k1.safetensors.tmp").exists()
    _, info = again.generate(NEAR, seed=5, steps=STEPS)
    assert info["hit"]
    again.close()


def test_stats_from_another_thread_during_generation(unet_pipe, tmp_path):
    cache = make_cache(unet_pipe, tmp_path)
    seen, stop = [], threading.Event()

    def poll():
        while not stop.wait(0.002):
            seen.append(cache.stats())

    t = threading.Thread(target=poll)
    t.start()
    try:
        cache.generate(BASE, seed=1, steps=STEPS)
        cache.generate(NEAR, seed=1, steps=STEPS)
    finally:
        stop.set()
        t.join()
    assert seen and all(set(s) == {"hits", "misses", "steps_saved", "bytes", "entries"} for s in seen)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    cache.close()


def test_calibrated_defaults(unet_pipe, tmp_path):
    """The thresholds calibrated on this model (ApproxCacheConfig's defaults): the same prompt
    skips half the steps, a near-duplicate as many as its similarity allows, an unrelated prompt
    misses (the 10% threshold is raised above unrelated pairs' similarity)."""
    cache = ApproxCache(ApproxCacheConfig(directory=tmp_path), unet_pipe)
    cache.generate(BASE, seed=1, steps=STEPS)
    _, same = cache.generate(BASE, seed=2, steps=STEPS)
    assert same["hit"] and same["skipped_steps"] == 5
    for prompt in (NEAR, FAR):
        _, info = cache.generate(prompt, seed=2, steps=STEPS)
        assert info["skipped_steps"] == choose_step(cosine(unet_pipe, BASE, prompt), STEPS, cache.config, {1, 2, 3, 4, 5})
    assert info["skipped_steps"] == 0 and not info["hit"]
    assert choose_step(0.2, 50, cache.config, {5, 10, 15, 20, 25}) == 0
    cache.close()


@pytest.mark.parametrize("model,spec", [("unet", "taylorseer"), ("unet", "teacache"), ("unet", "tgate"),
                                        ("dit", "fora"), ("dit", "dbcache")])
def test_caches_keyed_by_step_follow_a_resumed_run(unet_pipe, dit_pipe, model, spec):
    """Caches whose schedules read the step index (warm-up, interval, gate step) see the whole
    grid's indices K .. N-1 and a new generation: the resumed run stays near the plain one."""
    pipe = unet_pipe if model == "unet" else dit_pipe
    _, x = latents_at(pipe, BASE, 4, steps=12, seed=3)
    plain = pipe(BASE, steps=12, seed=3, start=(4, x))
    handle = sdinfer.accelerate(pipe, spec)
    try:
        cached = pipe(BASE, steps=12, seed=3, start=(4, x))
    finally:
        handle.remove()
    assert cached.nfe == 8
    assert 20 < psnr(cached.pixels, plain.pixels)
