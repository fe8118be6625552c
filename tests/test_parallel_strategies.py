"""CFG parallel, Ulysses and ring attention on 2 gloo ranks against one device.

One launch of ``parallel_worker.py strategies`` runs every case (the default DiT and UNet
through sdinfer's pipeline, 3 DDIM steps at cfg 4; a stock tiny PixArt pipeline; a tiny
DiTTransformer2DModel called directly) and the bad inputs; the tests judge its findings.
"""

from pathlib import Path

import pytest

from parallel_helpers import run_workers

WORKER = Path(__file__).parent / "parallel_worker.py"
STEPS = 3       # the worker's DDIM steps on the default models (one model call each)
PIXART_CALLS = 2
F32 = 4         # bytes


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    return run_workers(WORKER, "strategies", tmp_path_factory.mktemp("parallel") / "findings.json")


CASES = ["dit/cfg", "dit/ulysses", "dit/ring", "unet/cfg", "pixart/cfg", "pixart/ulysses", "pixart/ring",
         "tiny-dit/ulysses", "tiny-dit/ring"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_equals_one_device(findings, case):
    # measured: 0 (ulysses) to 2.7e-6 (ring on the default DiT); pixels in [0, 1], model outputs O(1)
    assert findings[case]["max_abs_error"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case, shape", [("dit/cfg", [1, 256]), ("dit/ulysses", [2, 128]), ("dit/ring", [2, 128]),
                                         ("unet/cfg", [1, 5]), ("pixart/cfg", [1, 16]),
                                         ("pixart/ulysses", [2, 8]), ("tiny-dit/ring", [2, 8])])
def test_each_rank_computes_its_share(findings, case, shape):
    """(batch, tokens) seen by a module inside the model: half the guided batch of 2 (cfg), or
    half the image tokens (256 on the default DiT, 16 on the tiny ones); the UNet's conv_in
    sees (batch, channels)."""
    assert findings[case]["leaf_shapes"] == [shape]


@pytest.mark.slow
def test_removing_a_strategy_restores_the_model(findings):
    assert all(findings[f"{name}/restored"] for name in ("dit", "unet", "pixart", "tiny-dit"))
    assert findings["dit/restored after errors"]


def per_step(findings, case, calls=STEPS):
    counted = findings[case]["bytes"]
    assert all(v % calls == 0 for v in counted.values())
    return {kind: v // calls for kind, v in counted.items()}


@pytest.mark.slow
def test_bytes_per_step_on_the_default_dit(findings):
    """SD3Transformer2DModel: B 2 (1 prompt, guided), H 4 heads of D 24, S 256 image tokens
    (32x32, patch 2), T 16 text tokens, L 4 joint-attention layers, P 2*2*3 outputs a token,
    N 2 ranks, float32 (the formulas in sequence_parallel.py and cfg_parallel.py)."""
    b, h, d, s, t, layers, p, n = 2, 4, 24, 256, 16, 4, 12, 2
    gather = b * (s // n) * p * (n - 1) * F32
    shard = b * h * (s // n) * d
    assert per_step(findings, "dit/ulysses") == {
        "all_to_all": layers * 4 * shard * (n - 1) // n * F32,
        "all_gather": layers * b * (h // n) * t * d * (n - 1) * F32 + gather}
    assert per_step(findings, "dit/ring") == {"ring": layers * 2 * shard * (n - 1) * F32, "all_gather": gather}
    assert per_step(findings, "dit/cfg") == {"all_gather": (b // n) * 3 * 32 * 32 * (n - 1) * F32}
    assert findings["dit/ulysses"]["calls"] == {"all_to_all": STEPS * layers * 2,     # q, k, v in one
                                                "all_gather": STEPS * (layers + 1)}
    assert findings["dit/ring"]["calls"] == {"ring": STEPS * layers * (n - 1), "all_gather": STEPS}


@pytest.mark.slow
def test_bytes_per_step_on_pixart_and_the_unet(findings):
    """Tiny PixArt: B 2, H 2 of D 8, S 16 tokens (8x8 latent, patch 2), L 2 self-attention
    layers (cross-attention sends nothing), P 2*2*8 (learned sigma); the UNet: 3x32x32 outputs."""
    b, h, d, s, layers, p, n = 2, 2, 8, 16, 2, 32, 2
    gather = b * (s // n) * p * (n - 1) * F32
    shard = b * h * (s // n) * d
    assert per_step(findings, "pixart/ulysses", PIXART_CALLS) == {
        "all_to_all": layers * 4 * shard * (n - 1) // n * F32, "all_gather": gather}
    assert per_step(findings, "pixart/ring", PIXART_CALLS) == {"ring": layers * 2 * shard * (n - 1) * F32,
                                                              "all_gather": gather}
    assert per_step(findings, "pixart/cfg", PIXART_CALLS) == {"all_gather": (b // n) * 8 * 8 * 8 * F32}
    assert per_step(findings, "unet/cfg") == {"all_gather": 1 * 3 * 32 * 32 * F32}


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [
    ("ulysses on a UNet", ["supports DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel",
                           "UNet2DConditionModel"]),
    ("ring on a UNet", ["SD3Transformer2DModel", "UNet2DConditionModel is not one of them"]),
    ("ulysses with 3 heads on 2 ranks", ["has 3 heads", "do not divide by 2 ranks"]),
    ("ring with 9 tokens on 2 ranks", ["9 tokens do not divide by 2 ranks"]),
    ("cfg on 1 rank", ["needs a world size of 2, got 1"]),
    ("cfg without guidance", ["guidance is off (cfg 1)"]),
    ("unknown strategy", ["unknown parallel strategy 'tensorparallel'", "asyncdiff, cfg", "ring, ulysses"]),
    ("two strategies without cfg", ["the one combination is cfg+NAME"]),
    ("cfg+ulysses on 2 ranks", ["needs an even world size of 4 or more, got 2"]),
])
def test_bad_input_is_a_clear_error(findings, case, words):
    message = findings["errors"][case]
    assert message is not None, f"{case}: no error"
    for w in words:
        assert w in message, message


@pytest.mark.slow
def test_three_ranks_chain_the_ring_and_split_heads_three_ways(tmp_path):
    """A tiny SD3 transformer: B 2, H 6 of D 8, S 36 image tokens (12x12, patch 2), T 5 text
    tokens, L 2 layers, P 2*2*4, N 3 ranks, one call."""
    found = run_workers(WORKER, "three", tmp_path / "three.json", ranks=3)
    b, h, d, s, t, layers, p, n = 2, 6, 8, 36, 5, 2, 16, 3
    gather = b * (s // n) * p * (n - 1) * F32
    shard = b * h * (s // n) * d
    for spec in ("ulysses", "ring"):
        assert found[spec]["max_abs_error"] <= 1e-5   # measured: 0 and 2.8e-7
    assert found["ulysses"]["bytes"] == {"all_to_all": layers * 4 * shard * (n - 1) // n * F32,
                                         "all_gather": layers * b * (h // n) * t * d * (n - 1) * F32 + gather}
    assert found["ring"]["bytes"] == {"ring": layers * 2 * shard * (n - 1) * F32, "all_gather": gather}


@pytest.mark.slow
def test_cfg_combined_with_another_strategy_on_four_ranks(tmp_path):
    """Ranks {0, 2} and {1, 3} hold the two guidance branches, {0, 1} and {2, 3} split the
    work within a branch: the default DiT's image tokens (256) in halves, or the default UNet's
    blocks (AsyncDiff, every step a warm-up step)."""
    found = run_workers(WORKER, "four", tmp_path / "four.json", ranks=4)
    for case in ("dit/cfg+ulysses", "dit/cfg+ring", f"unet/cfg+asyncdiff:warmup_steps={STEPS}"):
        assert found[case]["max_abs_error"] <= 1e-5, case
    assert found["dit/cfg+ulysses"]["leaf_shapes"] == [[1, 128]]   # half the batch, half the tokens
    assert found["dit/cfg+ulysses"]["bytes"]["all_gather"] > 0 and found["dit/cfg+ring"]["bytes"]["ring"] > 0
