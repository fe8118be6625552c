"""DistriFusion (displaced patch parallelism) on 2 gloo ranks against one device.

One launch of ``parallel_worker_distrifusion.py main`` runs every case on the default UNet at
64 x 64 (DDIM, cfg 4), a tiny stock UNet2DConditionModel called directly, and the bad inputs;
the tests judge its findings.
"""

from pathlib import Path

import pytest

from sdinfer.parallel import DistriFusionConfig, parse_spec
from parallel_helpers import run_workers

WORKER = Path(__file__).parent / "parallel_worker_distrifusion.py"
STEPS = 8           # the worker's DDIM steps for the exact and the traced runs
TRACED_WARMUP = 2
F32 = 4             # bytes


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    return run_workers(WORKER, "main", tmp_path_factory.mktemp("distrifusion") / "findings.json")


# ---- the default UNet, by hand (64 x 64 pixel-space latent, guided: B 2; N 2) -----------------
B, N, SIDE = 2, 2, 64
# (input channels, width) of every conv padded along the height (3 x 3, padding 1): conv_in (3 RGB
# + 2 coordinate channels), each ResNet's conv1 / conv2 (the up blocks' conv1 take the skip too),
# the two stride-2 downsamplers, the two upsamplers (after their 2x interpolation), conv_out
CONVS = ([(5, 64)]                                                # conv_in
         + [(16, 64), (16, 64), (16, 64)]                         # down 0: resnet, downsampler
         + [(16, 32), (32, 32), (32, 32)]                         # down 1: resnet, downsampler
         + [(32, 16), (64, 16)]                                   # down 2: resnet
         + [(64, 16)] * 4                                         # mid: two resnets
         + [(128, 16), (64, 16), (96, 16), (64, 16), (64, 32)]    # up 0: resnets (skips 64, 32), upsampler
         + [(96, 32), (32, 32), (48, 32), (32, 32), (32, 64)]     # up 1: resnets (skips 32, 16), upsampler
         + [(48, 64), (16, 64), (32, 64), (16, 64)]               # up 2: resnets (skips 16, 16)
         + [(16, 64)])                                            # conv_out
# self-attention (attn1 where only_cross_attention is false): down 2, mid, up 0 (two), all on the
# 16 x 16 level (S 256 tokens), K/V 64 wide; down 1 and up 1 are cross-attention only
ATTENTIONS = [(256, 64)] * 4
GROUPNORMS = 2 * 11 + 7 + 1     # two in each of 11 ResNets, one per Transformer2DModel, conv_norm_out
GROUPS = 8
OUT_CHANNELS = 3
LAYERS = len(CONVS) + len(ATTENTIONS) + GROUPNORMS


def formula_bytes_per_step() -> int:
    """The docstring of ``sdinfer.parallel.distrifusion``, term by term."""
    halos = sum(2 * 1 * B * c * w * (N - 1) * F32 for c, w in CONVS)
    kv = sum(2 * B * (s // N) * d * (N - 1) * F32 for s, d in ATTENTIONS)
    stats = GROUPNORMS * 2 * B * GROUPS * (N - 1) * F32
    output = B * OUT_CHANNELS * (SIDE // N) * SIDE * (N - 1) * F32
    return halos + kv + stats + output


def test_the_formula_on_the_default_unet():
    assert len(CONVS) == 28 and sum(c * w for c, w in CONVS) == 36160
    assert formula_bytes_per_step() == 578560 + 524288 + 3840 + 49152 == 1155840   # as the docstring says


@pytest.mark.slow
def test_warmup_covering_every_step_equals_one_device(findings):
    # measured: 2.1e-6 (float rounding of the patch-wise convs; 1.0e-5 on this CPU while the GroupNorm
    # statistics were summed in float32, 3.2e-6 on the CPU of an earlier session)
    assert findings["exact"]["max_abs_error"] <= 1e-5


@pytest.mark.slow
def test_bytes_per_step_follow_the_formula(findings):
    counted = findings["exact"]["bytes"]
    assert counted == {"all_gather": STEPS * formula_bytes_per_step()}
    assert findings["exact"]["calls"] == {"all_gather": STEPS * (LAYERS + 1)}
    for step in findings["traced"]["steps"]:   # the same bytes in every step, warm-up or stale
        assert step["bytes"] == formula_bytes_per_step()


@pytest.mark.slow
def test_after_warmup_the_exchanges_are_asynchronous(findings):
    """During warm-up every exchange is waited on in its own step; after it every layer's
    all-gather is started in one step and waited on in the next (the last step's after the run),
    and only the output gather is synchronous."""
    steps = findings["traced"]["steps"]
    assert len(steps) == STEPS
    for index, step in enumerate(steps):
        if index <= TRACED_WARMUP:   # the first step and the warm-up steps after it
            assert step == {"sync": LAYERS + 1, "async": 0, "other": 0, "bytes": formula_bytes_per_step()}
        else:
            assert step == {"sync": 1, "async": LAYERS, "other": 0, "bytes": formula_bytes_per_step()}


@pytest.mark.slow
def test_staleness_is_the_only_approximation(findings):
    """The same input three times with no warm-up after the first step: the stale exchanges then
    hold what fresh ones would, and every GroupNorm mode gives one device's output."""
    for mode in ("corrected", "stale", "sync"):
        assert findings["unchanged input"][mode] <= 1e-5, mode
    assert findings["traced"]["max_abs_error"] > 1e-5   # a real run after warm-up is not exact


@pytest.mark.slow
def test_paper_warmup_psnr_against_one_device(findings):
    # warm-up 4 (the paper's default; steps 0 .. 4 synchronous), corrected GroupNorm, 20 DDIM steps
    # at 64 x 64, cfg 4: measured 22.5 dB (over 50 steps: 23.5 dB; sync GroupNorm 23.8 / 21.4 dB).
    # Not the 30 dB first hoped for: at 64 x 64 (twice its training size) the default UNet decides
    # where its shapes go midway through sampling, and the stale steps move, grow or add a shape
    # (no seam; more warm-up barely helps until it covers about half the steps); so this is a
    # guard against regressions, not a quality claim
    assert findings["psnr"]["corrected"] >= 20


@pytest.mark.slow
def test_tiny_stock_unet_called_directly(findings):
    """Warm-up covering all three calls: one device's output; warm-up 0: the first call still
    exact, the later ones stale (not exact)."""
    assert findings["tiny-unet/warmup 2"]["max_abs_error"] <= 1e-5
    stale = findings["tiny-unet/warmup 0"]
    assert stale["max_abs_error_first_call"] <= 1e-5
    assert stale["max_abs_error"] > 1e-5


@pytest.mark.slow
def test_removing_the_strategy_restores_the_model(findings):
    assert findings["restored"] and findings["tiny-unet/restored"] and findings["restored after errors"]


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [
    ("world size 1", ["at least 2, got 1"]),
    ("a DiT", ["supports UNet2DConditionModel", "SD3Transformer2DModel is not one of them"]),
    ("height 36 on 2 ranks", ["latent height of 36", "2 x 4 = 8", "multiple of 8"]),
    ("unknown gn_mode", ["gn_mode must be one of corrected, stale, sync", "'async'"]),
    ("warm-up -1", ["warmup_steps (synchronous steps after the first) must be a whole number >= 0", "got -1"]),
])
def test_bad_input_is_a_clear_error(findings, case, words):
    message = findings["errors"][case]
    assert message is not None, f"{case}: no error"
    for w in words:
        assert w in message, message


def test_spec_string():
    assert parse_spec("distrifusion") == DistriFusionConfig(4, "corrected")
    assert parse_spec("distrifusion:warmup_steps=2,gn_mode=sync") == DistriFusionConfig(2, "sync")
