"""TemporalConv1d (a GEMM over unfolded windows) computes exactly what nn.Conv1d computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_policy.denoisers.unet import TemporalConv1d


def _pair(in_ch: int, out_ch: int, k: int) -> tuple[TemporalConv1d, nn.Conv1d]:
    torch.manual_seed(0)
    fast = TemporalConv1d(in_ch, out_ch, k).double()
    ref = nn.Conv1d(in_ch, out_ch, k, padding=k // 2).double()  # stride 1, "same" padding
    ref.load_state_dict(fast.state_dict())  # same parameter names: checkpoints load either way
    return fast, ref


# Odd kernels keep the length with padding k // 2 (the only kind the UNet uses); lengths down to
# 1 make the padding wider than the sequence.
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize(("B", "in_ch", "out_ch", "T"), [(2, 3, 5, 16), (1, 8, 4, 4), (3, 2, 6, 1)])
def test_outputs_and_gradients_match_conv1d(k, B, in_ch, out_ch, T):
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


def test_float32_and_non_contiguous_input():
    fast, ref = _pair(6, 4, 5)
    fast, ref = fast.float(), ref.float()
    x = torch.randn(2, 16, 6).transpose(1, 2)  # (B, C, T), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_even_kernel_is_refused(k):
    # Padding k // 2 on both sides would make the output one step longer than the input.
    with pytest.raises(ValueError, match=rf"kernel_size={k} must be odd"):
        TemporalConv1d(3, 4, k)
