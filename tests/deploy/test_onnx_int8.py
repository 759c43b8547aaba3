"""8-bit weights in the sampling graph: the same function up to rounding, a quarter the bytes."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import DDIMScheduler
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from diffusion_policy.deploy.onnx_int8 import (
    Conv1dAsMatMul,
    matmul_convolutions,
    quantize_matmul_weights,
)
from diffusion_policy.deploy.onnx_policy import (
    INT8_CHECK_MEAN,
    OnnxPolicy,
    _example_obs,
    _normalized,
    export_onnx,
)
from tests.deploy.fakes import tiny_policy


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(6, 4, 5, padding=2),
        nn.Conv1d(6, 4, 3, padding=1, bias=False),
        nn.Conv1d(6, 4, 1),
        nn.Conv1d(6, 4, 3, stride=2, padding=1),  # the UNet's downsampling
        nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1),  # its upsampling
        nn.ConvTranspose1d(6, 4, 5, stride=3, padding=1),
        nn.ConvTranspose1d(6, 4, 3, padding=1, bias=False),
    ],
    ids=repr,
)
def test_a_convolution_as_one_matrix_product_gives_the_same_output(conv):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 16)  # (B, C, T)
    torch.testing.assert_close(Conv1dAsMatMul(conv)(x), conv(x), atol=1e-5, rtol=1e-5)


def test_an_exported_convolution_computes_no_shapes():
    conv = Conv1dAsMatMul(nn.Conv1d(6, 4, 5, padding=2))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's note on the length read as an int
        torch.onnx.export(
            conv, (torch.randn(2, 6, 16),), buffer, dynamo=False, input_names=["x"],
            dynamic_axes={"x": {0: "batch"}}, opset_version=17,
        )  # fmt: skip
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert "MatMul" in ops and not ops & {"Shape", "Size"}


def test_convolutions_become_matrix_products_where_the_same_function():
    model = nn.Sequential(
        nn.Conv1d(4, 4, 5, padding=2), nn.Conv1d(4, 4, 3, stride=2, padding=1),
        nn.ConvTranspose1d(4, 4, 4, stride=2, padding=1), nn.Conv1d(4, 4, 3, padding="same"),
        nn.ConvTranspose1d(4, 4, 4, stride=2, padding=1, output_padding=1),
        nn.Conv1d(4, 4, 3, dilation=2),
    )  # fmt: skip
    kinds = [type(m) for m in matmul_convolutions(model)]
    assert kinds == [Conv1dAsMatMul] * 3 + [nn.Conv1d, nn.ConvTranspose1d, nn.Conv1d]
    assert isinstance(model[0], nn.Conv1d)  # the original is left alone
    with pytest.raises(ValueError, match="not a convolution Conv1dAsMatMul computes"):
        Conv1dAsMatMul(model[3])


def _graph(weight: np.ndarray, gemm_bias: np.ndarray | None = None) -> onnx.ModelProto:
    """Two products sharing one constant weight: MatMul (K, N), or Gemm with B (N, K) + bias."""
    k = weight.shape[1] if gemm_bias is not None else weight.shape[0]
    inits = [numpy_helper.from_array(weight, "w")]
    if gemm_bias is None:
        nodes = [helper.make_node("MatMul", [x, "w"], [y]) for x, y in (("a", "y1"), ("y1", "y2"))]
    else:
        inits.append(numpy_helper.from_array(gemm_bias, "b"))
        nodes = [
            helper.make_node("Gemm", [x, "w", "b"], [y], transB=1)
            for x, y in (("a", "y1"), ("y1", "y2"))
        ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, a: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"a": a})[0]


@pytest.mark.parametrize("gemm", [False, True])
def test_8_bit_weights_give_the_product_up_to_rounding_and_are_stored_once(gemm):
    rng = np.random.default_rng(0)
    n = 200  # not a multiple of the block: the last block is padded
    weight = (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32) if gemm else None
    a = rng.normal(size=(4, n)).astype(np.float32)
    model = _graph(weight, bias)
    exact = _run(model, a)
    assert quantize_matmul_weights(model) == 2
    assert [node.op_type for node in model.graph.node].count("MatMulNBits") == 2
    codes = [i for i in model.graph.initializer if i.data_type == TensorProto.UINT8]
    assert len(codes) == 1 and "w" not in {i.name for i in model.graph.initializer}
    approx = _run(model, a)
    rel = np.abs(approx - exact).max() / np.abs(exact).max()
    assert 0 < rel < 0.02, rel


def test_a_bias_added_to_a_product_becomes_the_product_s_bias_input():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(32, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["p1"]),
        helper.make_node("Add", ["p1", "b"], ["y1"]),  # the product's only reader: folded
        helper.make_node("MatMul", ["y1", "w"], ["p2"]),
        helper.make_node("Add", ["p2", "b"], ["y2"]),  # p2 is read twice: stays
        helper.make_node("Mul", ["p2", "y2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(weight[0], "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    a = rng.normal(size=(4, 32)).astype(np.float32)
    exact = _run(model, a)
    assert quantize_matmul_weights(model) == 2
    ops = [(node.op_type, list(node.input)[5:]) for node in model.graph.node]
    assert ops == [("MatMulNBits", ["b"]), ("MatMulNBits", []), ("Add", []), ("Mul", [])]
    np.testing.assert_allclose(_run(model, a), exact, rtol=0.05, atol=0.05 * np.abs(exact).max())


def test_an_int8_graph_samples_close_to_the_policy(tmp_path):
    policy = tiny_policy()
    policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    fp32 = OnnxPolicy(export_onnx(policy, tmp_path / "fp32.onnx"))
    int8 = OnnxPolicy(export_onnx(policy, tmp_path / "int8.onnx", weights="int8"))  # checked
    assert (fp32.weights, int8.weights) == ("fp32", "int8")
    ops = {node.op_type for node in onnx.load(int8.path).graph.node}
    assert "MatMulNBits" in ops and "Gemm" not in ops
    obs = _example_obs(policy, 8)
    mine = int8.predict_action(obs, generator=torch.Generator().manual_seed(0))
    theirs = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    diff = (_normalized(policy, mine) - _normalized(policy, theirs)).abs()
    assert 0 < diff.mean() < INT8_CHECK_MEAN


def test_unknown_weights_are_refused(tmp_path):
    policy = tiny_policy()
    policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    with pytest.raises(ValueError, match="weights='int4' must be one of"):
        export_onnx(policy, tmp_path / "x.onnx", weights="int4")
