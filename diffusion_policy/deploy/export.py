"""A trained policy as a folder: ``model.safetensors`` + a plain JSON ``config.json``.

The folder holds what a robot needs and nothing it must trust: the weights (normalizer buffers
included) as safetensors, which hold tensors only, and the architecture as JSON::

    {"format": "diffusion_policy.export/1",
     "policy": {"horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "num_inference_steps": 8},
     "shape_meta": {"obs": {...}, "action": {"shape": [2]}},
     "encoder": {"class": "LowDimEncoder", "kwargs": {"keys": null}},
     "denoiser": {"class": "ConditionalUnet1D", "kwargs": {"down_dims": [32, 64, 128], ...}},
     "noise_scheduler": {"class": "DPMSolverMultistepScheduler", "config": {...}}}

A policy fine-tuned with ``actor=noise`` adds its noise policy's settings to ``"policy"``
(``"noise_policy": {"hidden_dims": [...], "init_std": ..., "max_mean": ...}``).

:func:`load_exported` rebuilds the policy without Hydra and without importing or running
anything the folder names: class names go through the explicit tables below (diffusers
schedulers by name, checked to be ``SchedulerMixin`` subclasses), arguments must be plain JSON
values; anything else is refused with the offending key. An object inside an encoder's arguments
(the image encoder's backbone) is ``{"class": ..., "partial": true, "kwargs": {...}}`` with its
class from :data:`PARTS`.

The folder is a Hugging Face Hub model repository as it is: ``huggingface_hub.upload_folder``
publishes it and ``snapshot_download`` fetches it for :func:`load_exported`.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_policy.data.keys import ACTION, LOW_DIM, OBS, RGB
from diffusion_policy.denoisers.transformer import DiffusionTransformer
from diffusion_policy.denoisers.unet import ConditionalUnet1D
from diffusion_policy.encoders.lowdim import LowDimEncoder
from diffusion_policy.encoders.multimodal import ObsEncoder
from diffusion_policy.encoders.resnet import ResNetKeypointEncoder
from diffusion_policy.policies.diffusion_policy import DiffusionPolicy

FORMAT = "diffusion_policy.export/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_CONFIG_BYTES = 2**20

# The classes an export may name, by role.
ENCODERS: dict[str, type[nn.Module]] = {"LowDimEncoder": LowDimEncoder, "ObsEncoder": ObsEncoder}
DENOISERS: dict[str, type[nn.Module]] = {
    "ConditionalUnet1D": ConditionalUnet1D,
    "DiffusionTransformer": DiffusionTransformer,
}
PARTS: dict[str, type[nn.Module]] = {"ResNetKeypointEncoder": ResNetKeypointEncoder}
# Arguments that would read a file when the class is built; the weights come from the export.
FILE_ARGUMENTS = ("weights",)
TOP_KEYS = ("format", "policy", "shape_meta", "encoder", "denoiser", "noise_scheduler")
POLICY_KEYS = ("horizon", "n_obs_steps", "n_action_steps", "num_inference_steps")


class ExportError(ValueError):
    """An export that cannot be written, or a folder that is not a trusted export."""


# -- writing --------------------------------------------------------------------------------
def export_policy(policy: DiffusionPolicy, cfg: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` of a policy into ``out_dir``.

    Args:
        policy: The policy, with the weights to export (e.g. the EMA ones from
            :func:`~diffusion_policy.training.builders.load_policy`).
        cfg: The config it was built from (its ``encoder`` and ``denoiser`` nodes, as Hydra
            configs with ``_target_``); the scheduler is taken from the policy itself.
        out_dir: The folder to write; created if missing.

    Returns:
        The folder.

    Raises:
        ExportError: A class outside the tables, or a non-plain argument.
    """
    config = policy_config(policy, cfg)
    build_policy(config)  # what is written must load
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Cloned: safetensors refuses tensors that share memory.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in policy.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def policy_config(policy: DiffusionPolicy, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The plain JSON config of a policy built from ``cfg`` (see the module docstring)."""
    scheduler = policy.noise_scheduler
    scheduler_config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    config = {
        "format": FORMAT,
        "policy": {
            "horizon": policy.horizon,
            "n_obs_steps": policy.n_obs_steps,
            "n_action_steps": policy.n_action_steps,
            "num_inference_steps": policy.num_inference_steps,
        },
        "shape_meta": plain_values(policy.shape_meta),
        "encoder": _spec(cfg["encoder"], "encoder", ENCODERS),
        "denoiser": _spec(cfg["denoiser"], "denoiser", DENOISERS),
        "noise_scheduler": {
            "class": type(scheduler).__name__,
            "config": json.loads(json.dumps(plain_values(scheduler_config))),
        },
    }
    if policy.noise_policy is not None:  # RL fine-tuning's learned initial noise (plain values)
        config["policy"]["noise_policy"] = policy.noise_policy.config()
    _check_plain(config, "config")
    return config


def _spec(node: Mapping[str, Any], where: str, table: dict[str, type]) -> dict[str, Any]:
    """``{"class", "kwargs"}`` of a Hydra node, its class looked up in ``table``."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = plain_values(node)
    target = node.get("_target_")
    name = next((n for n, c in table.items() if f"{c.__module__}.{c.__qualname__}" == target), None)
    if name is None:
        raise ExportError(
            f"{where}._target_={target!r} is not exportable: an export may name only "
            f"{sorted(table)}"
        )
    kwargs = {}
    for key, value in node.items():
        if key in ("_target_", "_partial_"):
            continue
        if key.startswith("_"):
            raise ExportError(f"{where}.{key} is a Hydra option an export cannot hold")
        if key in FILE_ARGUMENTS:
            value = None  # the trained weights are in model.safetensors
        if isinstance(value, Mapping) and "_target_" in value:
            value = {"partial": bool(value.get("_partial_", False)),
                     **_spec(value, f"{where}.{key}", PARTS)}  # fmt: skip
        kwargs[key] = value
    return {"class": name, "kwargs": kwargs}


# -- reading --------------------------------------------------------------------------------
def load_exported(path: str | Path, device: str | torch.device = "cpu") -> DiffusionPolicy:
    """Rebuilds an exported policy, in eval mode, from ``config.json`` and ``model.safetensors``.

    Nothing named in the folder is imported or run: see the module docstring.

    Args:
        path: The export folder (e.g. what ``huggingface_hub.snapshot_download`` returned).
        device: Where to put the policy.

    Raises:
        ExportError: A missing file, an unknown class, a ``_target_``, a non-plain value, or
            weights that do not fit the config; the message names the key.
    """
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            raise ExportError(f"{folder} is not an export: it has no {file.name}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise ExportError(f"{config_path} is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_text(), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{config_path} is not valid JSON: {e}") from None
    policy = build_policy(config)
    state = load_file(str(weights_path))  # tensors only: no code runs
    own = policy.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise ExportError(
            f"{weights_path} does not fit {config_path}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    policy.load_state_dict(state)
    return policy.to(torch.device(device)).eval()


def build_policy(config: Any) -> DiffusionPolicy:
    """An untrained policy from a plain export config, after checking every part of it.

    Raises:
        ExportError: Naming the offending key.
    """
    if not isinstance(config, dict):
        raise ExportError(f"config must be a JSON object, got {type(config).__name__}")
    _check_plain(config, "config")
    _check_keys(config, TOP_KEYS, "config")
    if config["format"] != FORMAT:
        raise ExportError(f"config.format={config['format']!r}; this loader reads {FORMAT!r}")
    sizes = config["policy"]
    _check_keys(sizes, POLICY_KEYS, "config.policy", optional=("noise_policy",))
    noise_policy = sizes.get("noise_policy")
    if noise_policy is not None and not isinstance(noise_policy, dict):
        raise ExportError(f"config.policy.noise_policy must be an object, got {noise_policy!r:.80}")
    for key in POLICY_KEYS:
        value = sizes[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExportError(f"config.policy.{key}={value!r} must be an integer >= 1")
    shape_meta = _check_shape_meta(config["shape_meta"])
    encoder_cls, encoder_kwargs = _lookup(config["encoder"], "config.encoder", ENCODERS)
    denoiser_cls, denoiser_kwargs = _lookup(config["denoiser"], "config.denoiser", DENOISERS)
    scheduler = _scheduler(config["noise_scheduler"])
    try:
        return DiffusionPolicy(
            shape_meta=shape_meta,
            encoder=encoder_cls(shape_meta=shape_meta, **encoder_kwargs),
            denoiser=partial(denoiser_cls, **denoiser_kwargs),
            noise_scheduler=scheduler,
            horizon=sizes["horizon"],
            n_obs_steps=sizes["n_obs_steps"],
            n_action_steps=sizes["n_action_steps"],
            num_inference_steps=sizes["num_inference_steps"],
            noise_policy=noise_policy,
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ExportError(f"config does not build a policy: {type(e).__name__}: {e}") from None


def _lookup(spec: Any, where: str, table: dict[str, type]) -> tuple[type, dict[str, Any]]:
    """The class and built arguments of ``{"class", "kwargs"[, "partial"]}``."""
    if not isinstance(spec, dict) or "class" not in spec:
        raise ExportError(f"{where} must be an object with a 'class', got {spec!r:.80}")
    _check_keys(spec, ("class", "kwargs"), where, optional=("partial",))
    name = spec["class"]
    if not isinstance(name, str) or name not in table:
        raise ExportError(f"{where}.class={name!r} is not one of {sorted(table)}")
    kwargs = spec["kwargs"]
    if not isinstance(kwargs, dict):
        raise ExportError(f"{where}.kwargs must be an object, got {type(kwargs).__name__}")
    built = {}
    for key, value in kwargs.items():
        if key in FILE_ARGUMENTS and value is not None:
            raise ExportError(f"{where}.kwargs.{key}={value!r} would read a file; must be null")
        if isinstance(value, dict) and "class" in value:
            part, part_kwargs = _lookup(value, f"{where}.kwargs.{key}", PARTS)
            value = partial(part, **part_kwargs) if value.get("partial") else part(**part_kwargs)
        built[key] = value
    return table[name], built


def _scheduler(spec: Any) -> SchedulerMixin:
    where = "config.noise_scheduler"
    if not isinstance(spec, dict):
        raise ExportError(f"{where} must be an object")
    _check_keys(spec, ("class", "config"), where)
    name = spec["class"]
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (inspect.isclass(cls) and issubclass(cls, SchedulerMixin)):
        raise ExportError(f"{where}.class={name!r} is not a diffusers noise scheduler")
    if not isinstance(spec["config"], dict):
        raise ExportError(f"{where}.config must be an object")
    return cls.from_config(spec["config"])


def _check_shape_meta(meta: Any) -> dict[str, Any]:
    where = "config.shape_meta"
    if not isinstance(meta, dict):
        raise ExportError(f"{where} must be an object")
    _check_keys(meta, (OBS, ACTION), where)
    if not isinstance(meta[OBS], dict) or not meta[OBS]:
        raise ExportError(f"{where}.obs must be a non-empty object")
    entries = [(f"{where}.obs.{k}", v) for k, v in meta[OBS].items()]
    for path, entry in [*entries, (f"{where}.action", meta[ACTION])]:
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and shape and all(_is_size(n) for n in shape)):
            raise ExportError(f"{path}.shape={shape!r} must be a list of integers >= 1")
        kind = entry.get("type", LOW_DIM)
        if kind not in (LOW_DIM, RGB):
            raise ExportError(f"{path}.type={kind!r} must be {LOW_DIM!r} or {RGB!r}")
    return meta


def _check_keys(
    node: dict[str, Any], keys: tuple[str, ...], where: str, optional: tuple[str, ...] = ()
) -> None:
    missing = sorted(set(keys) - set(node))
    unknown = sorted(set(node) - set(keys) - set(optional))
    if missing or unknown:
        raise ExportError(f"{where}: missing keys {missing}, unknown keys {unknown}")


def _check_plain(value: Any, where: str) -> None:
    """JSON values only: no ``_``-keys (``_target_``, ...), interpolations or non-finite floats."""
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str) and "${" in value:
            raise ExportError(f"{where}={value!r}: interpolations are not plain values")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExportError(f"{where}={value!r} is not a finite number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("_"):
                raise ExportError(f"{where}.{key}: keys starting with '_' (e.g. _target_) "
                                  f"are refused")  # fmt: skip
            _check_plain(item, f"{where}.{key}")
        return
    raise ExportError(f"{where} is a {type(value).__name__}, not a plain JSON value")


def plain_values(value: Any) -> Any:
    """Mappings and sequences (OmegaConf nodes, tuples) as dicts with str keys and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple | ListConfig):
        return [plain_values(v) for v in value]
    return value


def _is_size(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number")
