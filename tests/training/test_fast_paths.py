"""Each fast path gives the plain path's results at a fixed seed, within a stated tolerance."""

import copy

import pytest
import torch

from diffusion_policy.training.checkpoint import load_checkpoint
from diffusion_policy.training.precision import autocast, cpu_has_bf16_math
from diffusion_policy.training.trainer import Trainer
from tests.helpers import debug_cfg
from tests.policies.test_diffusion_policy import fit_normalizer, make_batch, make_policy

CPU = torch.device("cpu")


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
