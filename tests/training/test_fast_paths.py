"""Each fast path gives the plain path's results at a fixed seed, within a stated tolerance."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_policy.training import precision
from diffusion_policy.training.checkpoint import load_checkpoint
from diffusion_policy.training.config_checks import ConfigError, TrainerSchema, check_fields
from diffusion_policy.training.precision import (
    PRECISIONS,
    autocast,
    choose_precision,
    cpu_flags,
    cpu_has_bf16_math,
    resolve_precision,
)
from diffusion_policy.training.trainer import Trainer
from tests.helpers import debug_cfg
from tests.policies.test_diffusion_policy import fit_normalizer, make_batch, make_policy

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TRAINER_YAML = dict(yaml.safe_load((REPO / "configs" / "trainer" / "default.yaml").read_text()))


def _policy_and_batch():
    policy = make_policy(n_obs_steps=2, n_action_steps=8)
    batch = make_batch(B=8)
    fit_normalizer(policy, batch)
    return policy, batch


def _loss(policy, batch):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(8, 16, 2, generator=g)
    timesteps = torch.randint(0, 20, (8,), generator=g)
    return policy(batch, noise=noise, timesteps=timesteps)


def _train(policy, batch, fused: bool, steps: int = 3) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6, fused=fused
    )
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(policy, batch).backward()
        optimizer.step()
    return policy.state_dict()


def test_fused_adamw_matches_the_per_tensor_loop():
    """Tolerance 1e-6 absolute on weights of order 0.1 after 3 steps (float32 round-off)."""
    policy, batch = _policy_and_batch()
    plain = _train(copy.deepcopy(policy), batch, fused=False)
    fused = _train(policy, batch, fused=True)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_denoiser_matches_eager_loss_gradients_and_actions():
    """Tolerance 1e-4 relative: inductor reorders float32 reductions."""
    eager, batch = _policy_and_batch()
    compiled = copy.deepcopy(eager)
    compiled.denoiser.compile(dynamic=False)

    losses = []
    for policy in (eager, compiled):
        loss = _loss(policy, batch)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)

    actions = [
        policy.eval().predict_action(batch["obs"], generator=torch.Generator().manual_seed(0))
        for policy in (eager, compiled)
    ]
    torch.testing.assert_close(actions[1]["action"], actions[0]["action"], rtol=1e-4, atol=1e-3)


def test_bf16_autocast_loss_is_close_to_fp32():
    """Tolerance 3% relative: bfloat16 keeps 8 significant bits in products and convolutions."""
    policy, batch = _policy_and_batch()
    fp32 = _loss(policy, batch)
    with autocast(CPU, "bf16"):
        bf16 = _loss(policy, batch)
    assert bf16.dtype == torch.float32  # the loss is reduced in float32
    torch.testing.assert_close(bf16, fp32, rtol=3e-2, atol=0)


def test_fp32_is_no_autocast_and_bad_precision_is_named():
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match=r"trainer\.precision='fp16'"):
        autocast(CPU, "fp16")


def test_bf16_detection_reads_cpu_flags():
    assert cpu_has_bf16_math("flags\t: fpu avx2 avx512f avx512_bf16 amx_tile")
    assert cpu_has_bf16_math("flags\t: fpu avx2 amx_bf16")
    assert not cpu_has_bf16_math("flags\t: fpu avx2 fma avx512f avx512_vnni")


AVX2_ONLY = cpu_flags("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\npower management:\n")
AVX512_BF16 = cpu_flags("flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16")


def test_cpu_flags_are_read_from_the_flags_line():
    assert {"fpu", "sse4_2", "avx", "avx2", "fma"} == AVX2_ONLY


@pytest.mark.parametrize(
    ("flags", "expected", "reason"),
    [
        (AVX2_ONLY, "fp32", r"no native bf16 \(flags: avx2\)"),
        (AVX512_BF16, "bf16", r"native bf16 \(flags: avx2 avx512f avx512_vnni avx512_bf16\)"),
        (frozenset({"avx2", "amx_tile", "amx_bf16"}), "bf16", r"amx_tile amx_bf16"),
    ],
)
def test_auto_precision_on_a_cpu_follows_its_bf16_flags(flags, expected, reason):
    chosen, why = choose_precision(CPU, flags=flags)
    assert chosen == expected
    assert re.search(reason, why), why


@pytest.mark.parametrize(("cuda_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(cuda_bf16, expected):
    assert choose_precision(torch.device("cuda"), cuda_bf16=cuda_bf16)[0] == expected


def test_auto_is_resolved_and_logged_once(monkeypatch, caplog):
    precision._auto_precision.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_ONLY)
    with caplog.at_level("INFO", logger=precision.__name__):
        assert resolve_precision("auto", CPU) == "fp32"
        with autocast(CPU, "auto"):
            assert not torch.is_autocast_enabled("cpu")
    precision._auto_precision.cache_clear()
    assert [r.getMessage() for r in caplog.records] == [
        "precision=auto -> fp32: this CPU has no native bf16 (flags: avx2)"
    ]
    assert resolve_precision("bf16", CPU) == "bf16"  # explicit values are kept


def test_schema_accepts_the_precisions_and_names_another():
    choices = {f.name: f for f in dataclasses.fields(TrainerSchema)}["precision"].metadata
    assert choices["choices"] == PRECISIONS
    with pytest.raises(ConfigError, match=r"trainer\.precision='fp16' must be one of"):
        check_fields(TrainerSchema, {**TRAINER_YAML, "precision": "fp16"}, prefix="trainer.")
    assert TRAINER_YAML["precision"] == "auto"  # the default
    check_fields(TrainerSchema, TRAINER_YAML, prefix="trainer.")


@pytest.mark.slow
def test_trainer_compiles_the_denoiser_and_checkpoints_plain_names(pusht_zarr_path, tmp_path):
    cfg = debug_cfg(
        pusht_zarr_path,
        "trainer.compile=true",
        "trainer.num_epochs=1",
        "trainer.max_train_steps_per_epoch=2",
        "trainer.max_val_steps=1",
        "trainer.rollout_every=0",
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.policy.denoiser._compiled_call_impl is not None
    assert trainer.ema.model.denoiser._compiled_call_impl is not None
    metrics = trainer.train()
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.ckpt")
    assert state["model"].keys() == trainer.policy.state_dict().keys()
    assert not any("_orig_mod" in k for k in state["model"])
