"""TemporalConv1d computes what nn.Conv1d computes, by either path; auto picks one by timing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffusion_policy.denoisers import temporal_conv
from diffusion_policy.denoisers.temporal_conv import TemporalConv1d, set_conv_path


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test starts with no measured choice and no forced path."""
    monkeypatch.setattr(temporal_conv, "CHOICES", {})
    monkeypatch.delenv(temporal_conv.ENV_VAR, raising=False)
    yield temporal_conv.CHOICES
    set_conv_path(None)


def _pair(in_ch: int, out_ch: int, k: int) -> tuple[TemporalConv1d, nn.Conv1d]:
    torch.manual_seed(0)
    fast = TemporalConv1d(in_ch, out_ch, k).double()
    ref = nn.Conv1d(in_ch, out_ch, k, padding=k // 2).double()  # stride 1, "same" padding
    ref.load_state_dict(fast.state_dict())  # same parameter names: checkpoints load either way
    return fast, ref


# Odd kernels keep the length with padding k // 2 (the only kind the UNet uses); lengths down to
# 1 make the padding wider than the sequence.
@pytest.mark.parametrize("path", ["gemm", "direct", "auto"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize(("B", "in_ch", "out_ch", "T"), [(2, 3, 5, 16), (1, 8, 4, 4), (3, 2, 6, 1)])
def test_outputs_and_gradients_match_conv1d(path, k, B, in_ch, out_ch, T):
    set_conv_path(path)
    fast, ref = _pair(in_ch, out_ch, k)
    x = torch.randn(B, in_ch, T, dtype=torch.float64)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_ref = fast(x_fast), ref(x_ref)
    assert y_fast.shape == y_ref.shape == (B, out_ch, T)
    torch.testing.assert_close(y_fast, y_ref)
    grad_out = torch.randn_like(y_ref)
    y_fast.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x_fast.grad, x_ref.grad)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("path", ["gemm", "direct"])
def test_float32_and_non_contiguous_input(path):
    set_conv_path(path)
    fast, ref = _pair(6, 4, 5)
    fast, ref = fast.float(), ref.float()
    x = torch.randn(2, 16, 6).transpose(1, 2)  # (B, C, T), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_the_two_paths_differ_by_float32_round_off_only():
    """Tolerance 1e-5: the paths sum the same 320 products in another order."""
    torch.manual_seed(0)
    conv = TemporalConv1d(64, 32, 5)
    x = torch.randn(4, 64, 16)
    gemm = temporal_conv.conv1d_gemm(x, conv.weight, conv.bias)
    direct = temporal_conv.conv1d_direct(x, conv.weight, conv.bias)
    torch.testing.assert_close(gemm, direct, rtol=1e-5, atol=1e-5)


def test_auto_times_each_shape_and_mode_once(fresh_choices, monkeypatch):
    trials = []

    def fake_time_paths(x, weight, bias, training):
        trials.append((tuple(x.shape), training))
        return {"gemm": 2.0, "direct": 1.0} if training else {"gemm": 1.0, "direct": 2.0}

    monkeypatch.setattr(temporal_conv, "time_paths", fake_time_paths)
    conv = TemporalConv1d(3, 4, 5)
    x = torch.randn(2, 3, 8)
    for _ in range(3):
        conv(x)  # training: forward + backward
        with torch.no_grad():
            conv(x)
    conv(torch.randn(1, 3, 8))  # another batch size: another shape
    assert trials == [((2, 3, 8), True), ((2, 3, 8), False), ((1, 3, 8), True)]
    assert sorted(fresh_choices.values()) == ["direct", "direct", "gemm"]


def test_a_near_tie_keeps_the_default_path():
    assert temporal_conv._faster({"gemm": 1.0, "direct": 0.95}) == temporal_conv.DEFAULT_PATH
    assert temporal_conv._faster({"gemm": 1.0, "direct": 0.5}) == "direct"
    assert temporal_conv._faster({"gemm": 0.5, "direct": 1.0}) == "gemm"


def test_measuring_leaves_gradients_and_the_random_stream_alone(fresh_choices):
    conv = TemporalConv1d(3, 4, 5)
    x = torch.randn(2, 3, 8)
    torch.manual_seed(5)
    conv(x)
    assert len(fresh_choices) == 1 and conv.weight.grad is None and conv.bias.grad is None
    drawn = torch.rand(3)
    torch.manual_seed(5)
    torch.testing.assert_close(drawn, torch.rand(3))


def test_measured_timings_are_positive_for_both_paths():
    conv = TemporalConv1d(8, 8, 3)
    times = temporal_conv.time_paths(torch.randn(2, 8, 4), conv.weight, conv.bias, training=True)
    assert set(times) == {"gemm", "direct"} and all(t > 0 for t in times.values())


def test_no_measurement_while_compiling_or_counting_flops(fresh_choices, monkeypatch):
    conv = TemporalConv1d(3, 4, 5)
    x = torch.randn(2, 3, 8)
    with FlopCounterMode(display=False) as counter:
        conv(x)
    assert fresh_choices == {}  # the trial runs would have been counted
    assert counter.get_total_flops() == 2 * 2 * 8 * 4 * 3 * 5
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    conv(x)
    assert fresh_choices == {}


@pytest.mark.parametrize("path", ["gemm", "direct"])
def test_forced_path_is_used_without_measuring(path, fresh_choices, monkeypatch):
    monkeypatch.setenv(temporal_conv.ENV_VAR, path)
    called = []
    monkeypatch.setitem(temporal_conv.CONV_PATHS, path, lambda *a: called.append(path))
    TemporalConv1d(3, 4, 5)(torch.randn(2, 3, 8))
    assert called == [path] and fresh_choices == {}


def test_unknown_path_is_named(monkeypatch):
    monkeypatch.setenv(temporal_conv.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"DP_CONV_PATH='fast' must be one of"):
        TemporalConv1d(3, 4, 5)(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"conv path='winograd'"):
        set_conv_path("winograd")


@pytest.mark.slow
def test_compiled_conv_traces_in_one_graph_and_matches_eager(fresh_choices):
    """The chooser must not break the graph; inside it, the cached or default path runs."""
    conv = TemporalConv1d(8, 16, 5)
    x = torch.randn(4, 8, 16)
    compiled = torch.compile(conv, fullgraph=True, dynamic=False)
    torch.testing.assert_close(
        compiled(x), nn.functional.conv1d(x, conv.weight, conv.bias, padding=2)
    )
    assert fresh_choices == {}
    with torch.no_grad():
        conv(x)  # eager: measured and cached
    assert len(fresh_choices) == 1
    with torch.no_grad():
        recompiled = torch.compile(conv, fullgraph=True, dynamic=False)(x)  # the cached path
    torch.testing.assert_close(recompiled, conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_even_kernel_is_refused(k):
    # Padding k // 2 on both sides would make the output one step longer than the input.
    with pytest.raises(ValueError, match=rf"kernel_size={k} must be odd"):
        TemporalConv1d(3, 4, k)
