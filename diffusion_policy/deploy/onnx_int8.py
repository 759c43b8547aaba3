"""Weight-only int8 for the sampling graph: what batch-1 sampling of a large UNet waits for.

At batch 1 the paper UNet's denoising step reads all of its weights (244 MB of convolution
weights in float32) to multiply them with a few dozen activation rows, so a step takes as long
as the memory takes to deliver them. Stored as 8-bit codes the weights are a quarter of the bytes.
:func:`export_onnx(..., weights="int8") <diffusion_policy.deploy.onnx_policy.export_onnx>`
writes such a graph in two steps:

- before tracing, :func:`matmul_convolutions` rewrites the UNet's convolutions (the down- and
  upsampling ones too) as one matrix product over stacked windows of their input
  (:class:`Conv1dAsMatMul`): the same function, with its weight as one matrix;
- after tracing, :func:`quantize_matmul_weights` replaces every matrix product with a constant
  weight (those, and the ``Linear`` layers) by ONNX Runtime's ``MatMulNBits``: the weight as
  8-bit codes in blocks of :data:`BLOCK_SIZE` along the reduction axis, one scale per block,
  and the bias added to the product as its bias input.

At batch 1 the small operations between the products cost as much as the products' arithmetic
(a few microseconds each, about 10,000 in a DDIM 16-step chunk of the paper UNet), so the
rewritten layers compute no shapes at run time.

ONNX Runtime then multiplies in int8 (``accuracy_level`` 4: the activations are quantized per
block too, on the fly). The actions differ from the float32 policy's by the rounding; how much
that costs a task is for its evaluation to say (``scripts/eval.py onnx=int8``).
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

__all__ = [
    "BLOCK_SIZE",
    "Conv1dAsMatMul",
    "converts",
    "matmul_convolutions",
    "quantize_matmul_weights",
]

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
    """A 1-D convolution, or transposed convolution, as one matrix product over stacked
    windows of its input: the same function, its weight one (windows * C_in, C_out) matrix
    ((windows * C_in, s * C_out) for a transposed one, below).

    A transposed convolution of stride s whose output is s times its input long (the UNet's
    upsampling: kernel 4, stride 2, padding 1) is an ordinary convolution with s outputs per
    input step, its phases: output ``s * m + r`` reads inputs ``m + d`` through the taps ``j``
    with ``s * d = r + padding - j``. Its weight then holds zeros where a phase has no tap at an
    offset (a third of the UNet's upsampling weights).

    Args:
        conv: The convolution (no dilation, one group, numeric padding; a transposed one
            without output padding and with ``kernel_size - 2 * padding == stride``, see
            :func:`converts`); its weights are copied.
    """

    def __init__(self, conv: nn.Conv1d | nn.ConvTranspose1d) -> None:
        super().__init__()
        if not converts(conv):
            raise ValueError(f"{conv} is not a convolution Conv1dAsMatMul computes")
        (s,), (p,) = conv.stride, conv.padding
        k = conv.kernel_size[0]
        if isinstance(conv, nn.ConvTranspose1d):
            c_in, c_out = conv.in_channels, conv.out_channels
            # (phase r, input offset d) -> tap j
            taps = {
                (r, (r + p - j) // s): j for r in range(s) for j in range(k) if (r + p - j) % s == 0
            }
            low, high = min(d for _, d in taps), max(d for _, d in taps)
            weight = conv.weight.new_zeros(high - low + 1, c_in, s, c_out)
            for (r, d), j in taps.items():
                weight[d - low, :, r] = conv.weight.detach()[:, :, j]  # (C_in, C_out)
            self.pad, self.step, self.phases = (-low, high), 1, s
        else:
            c_out, c_in = conv.out_channels, conv.in_channels
            # (C_out, C_in, k) -> (k, C_in, C_out): window i, channel c multiply row i * C_in + c.
            weight = conv.weight.detach().permute(2, 1, 0)
            self.pad, self.step, self.phases = (p, p), s, 1
        self.windows, self.c_in, self.c_out = weight.shape[0], c_in, c_out
        self.weight = nn.Parameter(weight.reshape(self.windows * c_in, -1).clone())
        # The bias of every phase, added to the product (the int8 graph folds it in).
        bias = conv.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().repeat(self.phases))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T) -> (B, C_out, T')."""
        # As Python ints the length and the window indices are constants of a traced graph
        # (only its batch is free), not shape arithmetic run at every call: the paper UNet's
        # DDIM 16-step graph had 18.8k nodes to run with them traced, 11.6k without.
        n = self.windows
        t_out = (int(x.shape[2]) + sum(self.pad) - n) // self.step + 1
        starts = torch.arange(t_out)[:, None] * self.step  # (T', 1)
        x = nn.functional.pad(x.transpose(1, 2), (0, 0, *self.pad))  # (B, T + pads, C_in)
        x = x[:, starts + torch.arange(n)].reshape(-1, t_out, n * self.c_in)  # (B, T', n * C_in)
        y = x @ self.weight  # (B, T', s * C_out)
        if self.bias is not None:
            y = y + self.bias
        if self.phases > 1:
            y = y.reshape(-1, t_out * self.phases, self.c_out)  # (B, T' * s, C_out)
        return y.transpose(1, 2)


def converts(conv: nn.Module) -> bool:
    """Whether :class:`Conv1dAsMatMul` computes ``conv``."""
    if not isinstance(conv, nn.Conv1d | nn.ConvTranspose1d):
        return False
    plain = conv.dilation == (1,) and conv.groups == 1 and isinstance(conv.padding, tuple)
    if isinstance(conv, nn.ConvTranspose1d):
        k, (s,), (p,) = conv.kernel_size[0], conv.stride, conv.padding
        return plain and conv.output_padding == (0,) and k - 2 * p == s
    return plain


def matmul_convolutions(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every 1-D convolution :class:`Conv1dAsMatMul` computes as
    one."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if converts(child):
                setattr(parent, name, Conv1dAsMatMul(child))
    return module


def quantize_matmul_weights(model: onnx.ModelProto, block_size: int = BLOCK_SIZE) -> int:
    """Replaces, in place, every ``MatMul`` with a constant 2-D weight and every plain ``Gemm``
    (``Linear``: weight transposed, no scaling) by ``MatMulNBits`` with 8-bit weights.

    Symmetric codes per block of ``block_size`` weights along the reduction axis: a weight
    ``w`` is stored as ``round(w / s) + 128`` with ``s = max|w| / 127`` over its block. A weight
    shared by several nodes (the unrolled denoising steps) is stored once. A bias (the
    ``Gemm``'s, or a constant vector added to the ``MatMul``'s product and nothing else) becomes
    the node's bias input: one node to run instead of two.

    Args:
        model: The graph; changed in place.
        block_size: Weights per scale (a power of two, at least 16).

    Returns:
        The number of nodes replaced.
    """
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    readers.update(out.name for out in graph.output)
    bias_adds = {  # product -> the Add of a constant vector that is its only reader
        node.input[0]: node
        for node in graph.node
        if node.op_type == "Add" and _vector(weights.get(node.input[1])) is not None
    }
    coded: dict[tuple[str, bool], tuple[str, str, int, int]] = {}  # -> codes, scales, K, N
    nodes, folded, replaced = [], set(), 0
    for node in graph.node:
        if node.op_type == "Add" and node.output[0] in folded:
            continue
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
        out, bias, bias_add = node.output[0], [], None
        add = bias_adds.get(out)
        if transposed and len(node.input) > 2 and node.input[2]:
            if _vector(weights.get(node.input[2])) == n:
                bias = ["", "", node.input[2]]  # after the absent zero points and g_idx
            else:  # a bias MatMulNBits does not take stays an Add
                out = f"{out}.nobias"
                bias_add = helper.make_node("Add", [out, node.input[2]], [node.output[0]])
        elif add is not None and readers[out] == 1 and _vector(weights[add.input[1]]) == n:
            out, bias = add.output[0], ["", "", add.input[1]]
            folded.add(out)
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], codes_name, scales_name, *bias],
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
        if bias_add is not None:
            nodes.append(bias_add)
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


def _vector(init: onnx.TensorProto | None) -> int | None:
    """The length of a 1-D constant, else None."""
    return init.dims[0] if init is not None and len(init.dims) == 1 else None


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
