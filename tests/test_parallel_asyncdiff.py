"""AsyncDiff on 2 gloo ranks against one device (``parallel_worker_asyncdiff.py``): the default
UNet at 64x64 and the default DiT at 32x32, DDIM 8 steps, cfg 4, one prompt."""

from pathlib import Path

import pytest

from parallel_helpers import run_workers

WORKER = Path(__file__).parent / "parallel_worker_asyncdiff.py"
STEPS = 8
F32 = 4
B = 2   # one prompt, guided: both branches in one batch


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    return run_workers(WORKER, None, tmp_path_factory.mktemp("asyncdiff") / "findings.json")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "dit"])
def test_every_step_a_warmup_step_equals_one_device(findings, model):
    assert findings[model]["exact_max_abs_error"] <= 1e-5   # measured: 0 (every rank runs the whole model)
    assert all(rank["bytes"] == {} for rank in findings[model]["exact"]["ranks"])


@pytest.mark.slow
@pytest.mark.parametrize("model, least", [("unet", 18), ("dit", 8)])
def test_stale_components_differ_but_stay_near_one_device(findings, model, least):
    """8 steps with 1 warm-up step: 7 of 8 calls read the previous call's features, which at 8
    steps are far apart (measured: UNet 21.9 dB, DiT 10.2 dB; at 50 steps 25.3 and 31.5 dB,
    BENCHMARKS.md)."""
    assert least < findings[model]["stale_psnr"] < 100


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "dit"])
def test_each_rank_runs_only_its_component_after_warmup(findings, model):
    stale = findings[model]["stale"]
    owners = stale["owners"]
    assert owners == sorted(owners) and set(owners) == {0, 1}     # contiguous, both ranks busy
    for rank, seen in enumerate(stale["ranks"]):
        # the warm-up call runs every block; the 7 later calls only the rank's own
        assert seen["block_runs"] == [STEPS if owner == rank else 1 for owner in owners]


@pytest.mark.slow
def test_removing_it_restores_the_model(findings):
    assert findings["unet"]["restored"] and findings["dit"]["restored"]


def test_split_balances_the_largest_component():
    from sdinfer.parallel.asyncdiff import balanced_split

    assert balanced_split([5, 1, 1, 1, 1, 1, 4], 2) == [0, 0, 0, 1, 1, 1, 1]    # 8 | 7
    assert balanced_split([1, 1, 1, 1], 2) == [0, 0, 1, 1]
    assert balanced_split([2, 2, 2, 3, 3], 2) == [0, 0, 0, 1, 1]      # 6 | 6
    assert balanced_split([4, 1, 1, 4, 1, 1], 3) == [0, 0, 1, 1, 2, 2]  # 5 | 5 | 2


def sent(findings, model, rank):
    return findings[model]["stale"]["ranks"][rank]["bytes"].get("broadcast", 0)


@pytest.mark.slow
def test_bytes_per_step_on_the_default_dit(findings):
    """SD3 joint blocks, 2 ranks: blocks 0-1 on rank 0, 2-3 on rank 1.  Rank 0 sends block 1's
    output (text 16 x 96 and image 256 x 96 tokens a sample) at each stale call but the last
    (6 calls); rank 1 the model output (3 x 32 x 32 a sample) at each of the 7 stale calls."""
    stale = findings["dit"]["stale"]
    assert stale["owners"] == [0, 0, 1, 1] and stale["exchanged"] == [1]
    assert sent(findings, "dit", 0) == 6 * B * (16 + 256) * 96 * F32
    assert sent(findings, "dit", 1) == 7 * B * 3 * 32 * 32 * F32
    assert stale["ranks"][0]["calls"] == {"broadcast": 6} and stale["ranks"][1]["calls"] == {"broadcast": 7}


@pytest.mark.slow
def test_bytes_per_step_on_the_default_unet(findings):
    """UNet2DConditionModel 16/32/64 channels at 64x64: each block's output (elements a sample),
    hidden states and, for down blocks, the skip features the mid and up blocks read."""
    outputs = [16 * (32 * 32 + 64 * 64 + 32 * 32),   # down 0: hidden 16x32x32, skips 16x64x64 + 16x32x32
               32 * (16 * 16 + 32 * 32 + 16 * 16),   # down 1: hidden 32x16x16, skips 32x32x32 + 32x16x16
               64 * (16 * 16 + 16 * 16),             # down 2 (no downsampler): hidden + one skip
               64 * 16 * 16,                         # mid
               64 * 32 * 32, 32 * 64 * 64, 16 * 64 * 64]   # up 0-2 (upsampled)
    stale = findings["unet"]["stale"]
    owners = stale["owners"]
    after_down = set(owners[3:])
    exchanged = {b for b in range(6) if owners[b + 1] != owners[b]}
    exchanged |= {b for b in range(3) if after_down - {owners[b]}}
    assert stale["exchanged"] == sorted(exchanged)
    for rank in (0, 1):
        expected = 6 * sum(B * outputs[b] * F32 for b in exchanged if owners[b] == rank)
        expected += 7 * B * 3 * 64 * 64 * F32 if rank == owners[-1] else 0
        assert sent(findings, "unet", rank) == expected


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [
    ("world size 1", ["needs a world size of 2 or more, got 1"]),
    ("no warm-up", ["warmup_steps=0", "at least 1 synchronous step"]),
    ("stride 2 on 2 ranks", ["stride 2", "needs a world size of 3 or more, got 2"]),
    ("stride 3", ["stride=3", "strides are 1 and 2"]),
])
def test_bad_input_is_a_clear_error(findings, case, words):
    message = findings["errors"][case]
    assert message is not None, f"{case}: no error"
    for w in words:
        assert w in message, message


# ---- stride 2: 2 components on 3 ranks ------------------------------------------------------
@pytest.fixture(scope="module")
def stride2(tmp_path_factory):
    return run_workers(WORKER, "stride2", tmp_path_factory.mktemp("asyncdiff2") / "findings.json", ranks=3)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "dit"])
def test_stride_2_every_step_a_warmup_step_equals_one_device(stride2, model):
    assert stride2[model]["exact_max_abs_error"] <= 1e-5
    assert all(rank["bytes"] == {} for rank in stride2[model]["exact"]["ranks"])


@pytest.mark.slow
@pytest.mark.parametrize("model, least", [("unet", 11), ("dit", 8)])
def test_stride_2_is_stale_but_near_one_device(stride2, model, least):
    """8 steps, 1 warm-up: steps 2, 4 and 6 reuse the components computed ahead at their
    timestep, on the previous step's features (measured: UNet 13.3 dB, DiT 9.6 dB; at 50 steps
    in BENCHMARKS.md)."""
    assert least < stride2[model]["stale_psnr"] < 100


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "dit"])
def test_stride_2_runs_each_component_on_its_rank_and_the_last_on_the_extra_rank(stride2, model):
    stale = stride2[model]["stale"]
    owners = stale["owners"]
    assert owners == sorted(owners) and set(owners) == {0, 1}
    # the warm-up call runs every block; then steps 1, 3, 5, 7 compute and 2, 4, 6 run no block
    for rank, seen in enumerate(stale["ranks"]):
        mine = owners[-1] if rank == 2 else rank
        assert seen["block_runs"] == [1 + 4 if owner == mine else 1 for owner in owners]


@pytest.mark.slow
def test_stride_2_bytes_on_the_default_dit(stride2):
    """Blocks 0-1 on rank 0, 2-3 on rank 1, the last component also on rank 2.  At each compute
    step but the last (steps 1, 3, 5) rank 0 broadcasts block 1's output (text 16 and image 256
    tokens of 96 a sample) and rank 1 the last block's (image tokens only: SD3's last block drops
    the text); rank 2 the model output at every compute step (4).  A broadcast to 2 others sends
    its bytes twice."""
    stale = stride2["dit"]["stale"]
    assert stale["exchanged"] == [1, 3]
    sent2 = [rank["bytes"].get("broadcast", 0) for rank in stale["ranks"]]
    assert sent2 == [3 * B * (16 + 256) * 96 * F32 * 2, 3 * B * 256 * 96 * F32 * 2, 4 * B * 3 * 32 * 32 * F32 * 2]


@pytest.mark.slow
def test_stride_2_refuses_a_sampler_with_two_calls_a_step(stride2):
    message = stride2["errors"]["two calls a step"]
    assert message is not None and "more than once a step" in message and "stride=1" in message
