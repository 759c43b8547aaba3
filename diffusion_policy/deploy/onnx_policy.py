"""A policy's whole sampling as one ONNX graph, run by ONNX Runtime.

For a deterministic sampler (DDIM, DPM-Solver++, UniPC: any with a
:class:`~diffusion_policy.policies.sampler_plan.SamplerPlan`) the sampling of an action chunk is
a fixed function of the observations and the initial noise: normalization, encoder, every
denoising step and the un-normalization. :func:`export_onnx` writes that function as one graph
(``policy.onnx``) and :class:`OnnxPolicy` runs it::

    python scripts/export.py checkpoint=... out=exports/pusht onnx=true
    python scripts/serve.py checkpoint=exports/pusht/policy.onnx

ONNX Runtime runs the graph with less overhead per operation than torch at batch 1 (on a
2-core AVX2 CPU, one thread: the CPU recipe's UniPC 5-step chunk in 8.6 ms, against 16.2 ms
for the ``torch.compile``-d loop; README "Performance"), needs no compile at start-up, and the
file runs without torch or this package (C++, other runtimes). The noise stays an input, so
the caller seeds it.

The graph file is data: ONNX Runtime runs only the standard operators it holds, and the
policy's settings come from a JSON entry of the file's metadata, read as plain values.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from diffusion_policy.data.keys import ACTION, RGB
from diffusion_policy.deploy.export import plain_values
from diffusion_policy.deploy.onnx_int8 import matmul_convolutions, quantize_matmul_weights
from diffusion_policy.policies.diffusion_policy import DiffusionPolicy

FORMAT = "diffusion_policy.onnx/1"
METADATA_KEY = "diffusion_policy"
OPSET = 17
NOISE = "noise"
ACTION_PRED = "action_pred"
# The largest difference from the torch policy accepted when an export is checked, in
# normalized action units ([-1, 1]; float32, the runtimes' convolutions sum in other orders).
CHECK_ATOL = 1e-3
# With int8 weights the actions differ by the rounding: the check then bounds their mean
# difference: 0.003-0.024 on two trained BlockPush policies, 0.034-0.041 on an untrained paper
# UNet, where another initial noise moves them by 0.05-0.11 and 0.23.
INT8_CHECK_MEAN = 0.05
WEIGHTS = ("fp32", "int8")


class OnnxExportError(ValueError):
    """A policy that cannot be exported as a graph, or a file that is not one of ours."""


class SamplingGraph(nn.Module):
    """Raw observations + initial noise -> the action chunk: what :func:`export_onnx` traces.

    Args:
        policy: A policy whose sampler has a plan (:meth:`DiffusionPolicy.sampler_plan`).
    """

    def __init__(self, policy: DiffusionPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.keys = list(policy.shape_meta["obs"])

    def forward(self, noise: torch.Tensor, *obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``noise`` (B, T, Da) and the observations {key: (B, To, ...)} in ``keys`` order ->
        (the executed actions (B, Ta, Da), the whole horizon (B, T, Da))."""
        named = dict(zip(self.keys, obs, strict=True))
        cond = self.policy.encode_obs(named)  # (B, To, F)
        sample = self.policy.sample_with_plan(noise, cond)  # (B, T, Da)
        out = self.policy.actions_from_sample(sample, self.policy.action_offset(named))
        return out[ACTION], out[ACTION_PRED]


def export_onnx(
    policy: DiffusionPolicy, path: str | Path, check: bool = True, weights: str = "fp32"
) -> Path:
    """Writes the policy's sampling (:class:`SamplingGraph`) to ``path`` as ONNX.

    The batch size stays free. The layers ONNX Runtime runs slowly are rewritten first
    (:func:`for_onnx_runtime`). The file is written atomically.

    Args:
        policy: The policy; its sampler must be deterministic (no DDPM).
        path: The ``.onnx`` file to write.
        check: Run the written graph with ONNX Runtime and compare its actions with the
            policy's on random observations (:data:`CHECK_ATOL`; with int8 weights the mean
            difference, :data:`INT8_CHECK_MEAN`).
        weights: ``fp32``, or ``int8``: the matrix products' weights as 8-bit codes
            (:mod:`diffusion_policy.deploy.onnx_int8`), for batch-1 sampling of large models.

    Returns:
        The path.

    Raises:
        OnnxExportError: The sampler draws noise or has no plan, the policy draws its noise
            from a learned ``noise_policy`` (the graph takes N(0, I) noise), or the check
            failed (then nothing is written).
    """
    if policy.noise_policy is not None:
        raise OnnxExportError(
            "the policy has a noise_policy (RL fine-tuning with actor=noise); the exported "
            "graph starts from N(0, I) noise and would drop it"
        )
    if policy.sampler_plan() is None:
        raise OnnxExportError(
            f"{type(policy.noise_scheduler).__name__} with {policy.num_inference_steps} steps "
            f"is not a deterministic sampler; export with DDIM, DPM-Solver++ or UniPC "
            f"(noise_scheduler=... num_inference_steps=...)"
        )
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} must be one of {WEIGHTS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    policy = policy.eval()
    traced = matmul_convolutions(policy) if weights == "int8" else policy
    graph = SamplingGraph(for_onnx_runtime(traced))
    noise = torch.randn(2, policy.horizon, policy.action_dim)  # (B, T, Da): shapes only
    example = (noise, *_example_obs(policy, 2).values())
    names = [NOISE, *graph.keys]
    free_batch = {name: {0: "batch"} for name in (*names, ACTION, ACTION_PRED)}
    buffer = io.BytesIO()
    # The TorchScript-based exporter: it traced the test policy's unrolled 4-step loop in 6 s
    # here, the torch.export-based one in over 2 minutes.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            example,
            buffer,
            dynamo=False,
            input_names=names,
            output_names=[ACTION, ACTION_PRED],
            dynamic_axes=free_batch,
            opset_version=OPSET,
        )
    model = onnx.load_from_string(buffer.getvalue())
    if weights == "int8":
        quantize_matmul_weights(model)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(_metadata(policy, weights)))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save(model, tmp)
        if check:
            _check_export(policy, OnnxPolicy(tmp), weights)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Conv1dAs2d(nn.Module):
    """A 1-D convolution (or transposed convolution) computed as a 2-D one over (B, C, 1, T).

    ONNX Runtime's blocked (NCHWc) convolution kernels take 2-D convolutions only; for the
    CPU recipe's UNet they made the UniPC 5-step graph sample in 8.6 ms instead of 10.0 ms
    (batch 1, one thread, 2-core AVX2 CPU).

    Args:
        conv: The convolution; its weights are copied.
    """

    def __init__(self, conv: nn.Conv1d | nn.ConvTranspose1d) -> None:
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose1d)
        self.weight = nn.Parameter(conv.weight.detach().unsqueeze(2).clone())  # (., ., 1, k)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.stride, self.dilation = (1, conv.stride[0]), (1, conv.dilation[0])
        self.padding = (0, conv.padding[0])
        self.output_padding = (0, conv.output_padding[0])
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C', T')."""
        x = x.unsqueeze(2)  # (B, C, 1, T)
        if self.transposed:
            y = nn.functional.conv_transpose2d(
                x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                self.groups, self.dilation,
            )  # fmt: skip
        else:
            y = nn.functional.conv2d(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return y.squeeze(2)


class ExpMish(nn.Module):
    """Mish, ``x * tanh(softplus(x))``, computed as ``x * n / (n + 2)`` with
    ``n = e^x (e^x + 2)``: the same function (tanh(log u) = (u^2 - 1) / (u^2 + 1), u = 1 + e^x).

    ONNX Runtime's ``Softplus`` is not vectorized, its ``Exp`` is: the paper UNet's DDIM 16-step
    graph sampled in 279 ms instead of 300 ms (batch 1, two threads, 2-core AVX-512 AMD EPYC), the
    CPU recipe's in 4.6 ms instead of 5.3 ms (one thread).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Above 20, n / (n + 2) is 1 in float32; the clamp keeps e^x finite.
        n = torch.exp(x.clamp(max=20.0))
        n = n * (n + 2.0)
        return x * (n / (n + 2.0))


class GroupNormOfConstantShape(nn.Module):
    """``nn.GroupNorm`` over (B, C, ...) whose exported graph reshapes to constant shapes.

    ``nn.GroupNorm`` exports as a reshape to groups, ``InstanceNormalization`` and a reshape back
    to the input's shape, read from the input at every call (``Shape``, ``Gather``: two more
    operations per norm, 800 in the paper UNet's DDIM 16-step chunk, each costing at batch 1
    about as much as a norm's arithmetic). All but the batch are constants of a traced graph, so
    this reshapes to them.

    Args:
        norm: The group norm (affine); its weights are copied.
    """

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone())  # (C,)
        self.bias = nn.Parameter(norm.bias.detach().clone())
        # Given, the exporter takes the groups' count from these instead of asking for it.
        self.register_buffer("unit", torch.ones(self.groups), persistent=False)
        self.register_buffer("zero", torch.zeros(self.groups), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) -> the same shape."""
        shape = [int(d) for d in x.shape[1:]]  # (C, ...)
        groups = x.reshape(-1, self.groups, math.prod(shape) // self.groups)
        y = nn.functional.instance_norm(groups, weight=self.unit, bias=self.zero, eps=self.eps)
        per_channel = (-1,) + (1,) * (len(shape) - 1)  # (C, 1, ...)
        return y.reshape(-1, *shape) * self.weight.view(per_channel) + self.bias.view(per_channel)


def for_onnx_runtime(policy: DiffusionPolicy) -> DiffusionPolicy:
    """A copy of the policy computing the same function with layers ONNX Runtime runs fast:
    1-D convolutions as :class:`Conv1dAs2d`, ``nn.Mish`` as :class:`ExpMish`, group norms as
    :class:`GroupNormOfConstantShape`."""
    policy = copy.deepcopy(policy)
    for module in list(policy.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Conv1d | nn.ConvTranspose1d):
                setattr(module, name, Conv1dAs2d(child))
            elif isinstance(child, nn.Mish):
                setattr(module, name, ExpMish())
            elif isinstance(child, nn.GroupNorm) and child.affine:
                setattr(module, name, GroupNormOfConstantShape(child))
    return policy


class OnnxPolicy:
    """A policy exported by :func:`export_onnx`, sampled by ONNX Runtime.

    It has what the controller, the policy server and the env runner use of a
    :class:`DiffusionPolicy`: ``predict_action``, ``n_obs_steps``, ``n_action_steps``,
    ``horizon``, ``shape_meta``.

    Args:
        path: The ``.onnx`` file.
        threads: ONNX Runtime's intra-op threads (``serve.py threads=auto`` times the
            candidates with :meth:`set_num_threads`).

    Raises:
        OnnxExportError: The file is not a graph this package exported (missing or malformed
            metadata, other inputs), or ONNX Runtime cannot load it.
    """

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.path = Path(path)
        self._sessions: dict[int, Any] = {}
        self.set_num_threads(threads)
        meta = _read_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.n_obs_steps: int = meta["n_obs_steps"]
        self.n_action_steps: int = meta["n_action_steps"]
        self.horizon: int = meta["horizon"]
        self.action_dim: int = meta["action_dim"]
        self.shape_meta: dict[str, Any] = meta["shape_meta"]
        self.sampler: str = meta["sampler"]
        self.num_inference_steps: int = meta["num_inference_steps"]
        self.weights: str = meta.get("weights", "fp32")  # files of older versions: fp32
        self.keys = list(self.shape_meta["obs"])
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [NOISE, *self.keys]:
            raise OnnxExportError(f"{path}: inputs {inputs} are not {[NOISE, *self.keys]}")
        # uint8 images stay uint8, as the policy's encoder takes them.
        self._dtypes = {
            i.name: np.uint8 if i.type == "tensor(uint8)" else np.float32
            for i in self.session.get_inputs()
        }

    def set_num_threads(self, threads: int) -> None:
        """Samples with ``threads`` intra-op threads from now on (a session per count, kept
        until :meth:`drop_other_sessions`)."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be a count >= 1")
        if threads not in self._sessions:
            self._sessions[threads] = _session(self.path, threads)
        self.session = self._sessions[threads]
        self.threads = threads

    def drop_other_sessions(self) -> None:
        """Frees the sessions of other thread counts than the current one."""
        self._sessions = {self.threads: self.session}

    def predict_action(
        self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Samples actions as :meth:`DiffusionPolicy.predict_action` does (same noise for the
        same ``generator``).

        Args:
            obs: Raw observations {key: (B, >=To, ...)}; keys beyond the policy's are ignored.
            generator: Optional random generator for the initial noise.

        Returns:
            ``"action"`` (B, n_action_steps, Da) and ``"action_pred"`` (B, horizon, Da).
        """
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise KeyError(f"observation keys {missing} missing (the policy reads {self.keys})")
        feeds = {k: _array(obs[k][:, : self.n_obs_steps], self._dtypes[k]) for k in self.keys}
        for key, value in feeds.items():
            want = (self.n_obs_steps, *self.shape_meta["obs"][key]["shape"])
            if tuple(value.shape[1:]) != want:
                raise ValueError(f"observation {key!r}: (B, {want}) expected, got {value.shape}")
        B = next(iter(feeds.values())).shape[0]
        noise = torch.randn((B, self.horizon, self.action_dim), generator=generator)
        feeds[NOISE] = noise.numpy()
        action, action_pred = self.session.run([ACTION, ACTION_PRED], feeds)
        return {ACTION: torch.from_numpy(action), ACTION_PRED: torch.from_numpy(action_pred)}


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort  # the optional `onnx` extra

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: not its notes on constant folding
    # Worker threads (threads > 1) spin while waiting for work, ONNX Runtime's default: with
    # them sleeping instead, the paper UNet's DDIM 16-step graph took 296 ms instead of 252 ms
    # on two threads (batch 1, 2-core AVX-512 AMD EPYC), waking for every operation.
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise OnnxExportError(f"{path}: ONNX Runtime cannot load it: {err}") from err


def _metadata(policy: DiffusionPolicy, weights: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "n_obs_steps": policy.n_obs_steps,
        "n_action_steps": policy.n_action_steps,
        "horizon": policy.horizon,
        "action_dim": policy.action_dim,
        "shape_meta": plain_values(policy.shape_meta),
        "sampler": type(policy.noise_scheduler).__name__,
        "num_inference_steps": policy.num_inference_steps,
        "weights": weights,
    }


def _read_metadata(props: Mapping[str, str], path: str | Path) -> dict[str, Any]:
    """The policy settings of a graph file, checked to be the plain values we write."""
    if METADATA_KEY not in props:
        raise OnnxExportError(f"{path}: no {METADATA_KEY!r} metadata; not a policy export")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise OnnxExportError(f"{path}: its {METADATA_KEY!r} metadata is not JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OnnxExportError(f"{path}: metadata format is not {FORMAT!r}")
    for key in ("n_obs_steps", "n_action_steps", "horizon", "action_dim", "num_inference_steps"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OnnxExportError(f"{path}: metadata {key}={value!r} must be an integer >= 1")
    shape_meta = meta.get("shape_meta")
    if not (
        isinstance(shape_meta, dict)
        and isinstance(shape_meta.get("obs"), dict)
        and shape_meta["obs"]
        and all(isinstance(v, dict) for v in shape_meta["obs"].values())
    ):
        raise OnnxExportError(f"{path}: metadata shape_meta must map obs keys to their shapes")
    if not isinstance(meta.get("sampler"), str):
        raise OnnxExportError(f"{path}: metadata sampler must be a name")
    if meta.get("weights", "fp32") not in WEIGHTS:
        raise OnnxExportError(f"{path}: metadata weights={meta['weights']!r} not in {WEIGHTS}")
    return meta


def _check_export(policy: DiffusionPolicy, exported: OnnxPolicy, weights: str) -> None:
    """Raises unless the graph samples the policy's actions at batch 1 and 3."""
    for batch in (1, 3):
        obs = _example_obs(policy, batch)
        mine = exported.predict_action(obs, generator=torch.Generator().manual_seed(batch))
        theirs = policy.predict_action(obs, generator=torch.Generator().manual_seed(batch))
        diff = (_normalized(policy, mine) - _normalized(policy, theirs)).abs()
        what, diff, allowed = (
            ("mean", float(diff.mean()), INT8_CHECK_MEAN)
            if weights == "int8"
            else ("max", float(diff.max()), CHECK_ATOL)
        )
        if not diff <= allowed:
            raise OnnxExportError(
                f"the exported graph's actions differ from the policy's by {diff:.2e} ({what}) "
                f"at batch {batch} (allowed {allowed:.0e})"
            )


def _normalized(policy: DiffusionPolicy, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return policy.normalizer.normalize_key(ACTION, out[ACTION_PRED])  # (B, T, Da)


def _example_obs(policy: DiffusionPolicy, batch: int) -> dict[str, torch.Tensor]:
    """Random observations in the normalizer's range; images uint8."""
    g = torch.Generator().manual_seed(batch)
    obs = {}
    for key, meta in policy.shape_meta["obs"].items():
        shape = (batch, policy.n_obs_steps, *meta["shape"])
        if meta["type"] == RGB:
            obs[key] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            continue
        x = torch.rand(shape, generator=g)
        if key in policy.normalizer.dims:
            flat = policy.normalizer.unnormalize_key(key, x.flatten(2) * 2 - 1)
            x = flat.view_as(x)
        obs[key] = x
    return obs


def _array(value: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value, dtype=dtype)
