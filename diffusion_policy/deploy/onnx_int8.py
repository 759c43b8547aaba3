"""Weight-only int8 for the sampling graph: what batch-1 sampling of a large UNet waits for.

At batch 1 the paper UNet's denoising step reads all of its weights (244 MB of convolution
weights in float32) to multiply them with a few dozen activation rows, so a step takes as long
as the memory takes to deliver them. Stored as 8-bit codes the weights are a quarter of the bytes.
:func:`export_onnx(..., weights="int8") <diffusion_policy.deploy.onnx_policy.export_onnx>`
writes such a graph in two steps:

- before tracing, :func:`matmul_convolutions` rewrites the UNet's stride-1 convolutions as one
  matrix product over the stacked shifted windows (:class:`Conv1dAsMatMul`): the same function,
  with its weight as one (k * C_in, C_out) matrix;
- after tracing, :func:`quantize_matmul_weights` replaces every matrix product with a constant
  weight (those, and the ``Linear`` layers) by ONNX Runtime's ``MatMulNBits``: the weight as
  8-bit codes in blocks of :data:`BLOCK_SIZE` along the reduction axis, one scale per block.

ONNX Runtime then multiplies in int8 (``accuracy_level`` 4: the activations are quantized per
block too, on the fly). The actions differ from the float32 policy's by the rounding; how much
that costs a task is for its evaluation to say (``scripts/eval.py onnx=int8``).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

__all__ = ["BLOCK_SIZE", "Conv1dAsMatMul", "matmul_convolutions", "quantize_matmul_weights"]

# Codes per scale along the reduction axis. On a 2-core Xeon with AMX (one thread, beside a
# training run) the paper UNet's DDIM 16-step chunk took 241 ms with blocks of 128 against
# 696 ms with blocks of 32.
BLOCK_SIZE = 128
# MatMulNBits' int8 products (level 4); with level 0 (float32 products of the decoded weights)
# the same chunk took 3.8 s there.
ACCURACY_LEVEL = 4
BITS = 8
ZERO_CODE = 2 ** (BITS - 1)  # MatMulNBits' zero point when the graph gives none


class Conv1dAsMatMul(nn.Module):
    """A stride-1 1-D convolution as one matrix product over its stacked shifted windows.

    Args:
        conv: The convolution (stride 1, no dilation, one group); its weights are copied.
    """

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        c_out, c_in, k = conv.weight.shape
        self.kernel_size, self.padding = k, conv.padding[0]
        # (C_out, C_in, k) -> (k * C_in, C_out): row i * C_in + c multiplies window i, channel c.
        weight = conv.weight.detach().permute(2, 1, 0).reshape(k * c_in, c_out)
        self.weight = nn.Parameter(weight.clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T) -> (B, C_out, T')."""
        x = x.transpose(1, 2)  # (B, T, C_in)
        if self.padding:
            x = nn.functional.pad(x, (0, 0, self.padding, self.padding))
        t_out = x.shape[1] - self.kernel_size + 1
        windows = torch.cat([x[:, i : i + t_out] for i in range(self.kernel_size)], dim=2)
        y = windows @ self.weight  # (B, T', C_out)
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2)


def matmul_convolutions(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every stride-1, undilated, ungrouped ``nn.Conv1d`` as a
    :class:`Conv1dAsMatMul` (the UNet's down- and up-sampling convolutions stay)."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if (
                isinstance(child, nn.Conv1d)
                and child.stride == (1,)
                and child.dilation == (1,)
                and child.groups == 1
                and isinstance(child.padding, tuple)
            ):
                setattr(parent, name, Conv1dAsMatMul(child))
    return module


def quantize_matmul_weights(model: onnx.ModelProto, block_size: int = BLOCK_SIZE) -> int:
    """Replaces, in place, every ``MatMul`` with a constant 2-D weight and every plain ``Gemm``
    (``Linear``: weight transposed, no scaling) by ``MatMulNBits`` with 8-bit weights.

    Symmetric codes per block of ``block_size`` weights along the reduction axis: a weight
    ``w`` is stored as ``round(w / s) + 128`` with ``s = max|w| / 127`` over its block. A weight
    shared by several nodes (the unrolled denoising steps) is stored once.

    Args:
        model: The graph; changed in place.
        block_size: Weights per scale (a power of two, at least 16).

    Returns:
        The number of nodes replaced.
    """
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    coded: dict[tuple[str, bool], tuple[str, str, int, int]] = {}  # -> codes, scales, K, N
    nodes, replaced = [], 0
    for node in graph.node:
        transposed = _is_linear(node)
        w = weights.get(node.input[1]) if node.op_type == "MatMul" or transposed else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        key = (w.name, transposed)
        if key not in coded:
            w_kn = numpy_helper.to_array(w).astype(np.float32)
            w_kn = w_kn.T if transposed else w_kn  # (K, N)
            codes, scales = _block_codes(w_kn, block_size)
            names = (f"{w.name}.q8", f"{w.name}.q8_scale")
            graph.initializer.extend(map(numpy_helper.from_array, (codes, scales), names))
            coded[key] = (*names, *w_kn.shape)
        codes_name, scales_name, k, n = coded[key]
        bias = node.input[2] if transposed and len(node.input) > 2 and node.input[2] else None
        out = f"{node.output[0]}.nobias" if bias else node.output[0]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], codes_name, scales_name],
                [out],
                name=f"{node.name or node.output[0]}.q8",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=BITS,
                block_size=block_size,
                accuracy_level=ACCURACY_LEVEL,
            )
        )
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]]))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return replaced


def _is_linear(node: onnx.NodeProto) -> bool:
    """A ``Gemm`` computing ``A @ B.T + C``: what ``nn.Linear`` exports as."""
    if node.op_type != "Gemm":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        attrs.get("alpha", 1.0) == 1.0
        and attrs.get("beta", 1.0) == 1.0
        and attrs.get("transA", 0) == 0
        and attrs.get("transB", 0) == 1
    )


def _block_codes(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float weights -> codes (N, K / block, block) uint8 and scales (N * K / block,)."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = w.T
    padded = padded.reshape(n, blocks, block_size)
    scales = np.abs(padded).max(axis=2) / (ZERO_CODE - 1)  # (N, blocks)
    scales[scales == 0] = 1.0
    codes = np.rint(padded / scales[..., None]).clip(1 - ZERO_CODE, ZERO_CODE - 1) + ZERO_CODE
    return codes.astype(np.uint8), scales.astype(np.float32).reshape(-1)
