from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from diffusion_policy.denoisers.transformer import DiffusionTransformer
from diffusion_policy.training.optim import build_optimizer, split_decay

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4, "weight_decay": 1e-3}


def tiny_transformer() -> DiffusionTransformer:
    return DiffusionTransformer(
        action_dim=2, cond_dim=5, horizon=8, n_obs_steps=2, n_layer=2, n_head=2, n_emb=16
    )


def names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_matrices_rule_decays_weight_matrices_only():
    model = tiny_transformer()
    decay, no_decay = split_decay(model)
    decayed, kept = names(model, decay), names(model, no_decay)
    assert decayed.isdisjoint(kept)
    assert decayed | kept == {n for n, _ in model.named_parameters()}
    assert "input_emb.weight" in decayed and "head.weight" in decayed
    assert "decoder.layers.0.self_attn.in_proj_weight" in decayed
    assert "decoder.layers.0.multihead_attn.out_proj.weight" in decayed
    assert "decoder.layers.0.linear1.weight" in decayed
    for name in kept:  # biases, layer norms, position embeddings
        assert name.endswith("bias") or "norm" in name or "ln_f" in name or "pos_emb" in name, name
    assert {"pos_emb", "cond_pos_emb", "ln_f.weight", "input_emb.bias"} <= kept
    assert "decoder.layers.0.norm1.weight" in kept


def test_matrices_rule_skips_embedding_tables_and_keeps_convs():
    model = nn.Sequential(nn.Embedding(4, 3), nn.Conv1d(3, 3, 3), nn.GroupNorm(1, 3))
    decayed = names(model, split_decay(model)[0])
    assert decayed == {"1.weight"}


def test_build_optimizer_groups():
    model = tiny_transformer()
    opt = build_optimizer({**ADAMW, "weight_decay_on": "matrices"}, model)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))

    opt = build_optimizer(OmegaConf.create(ADAMW), model)  # "all" by default: one group
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-3
    assert isinstance(opt, torch.optim.AdamW)


def test_matrices_rule_leaves_biases_untouched_by_decay():
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.bias.fill_(1.0)
    opt = build_optimizer(
        {**ADAMW, "lr": 0.1, "weight_decay": 0.5, "weight_decay_on": "matrices"}, model
    )
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    weight = model.weight.detach().clone()
    opt.step()  # zero gradients: only weight decay moves parameters
    torch.testing.assert_close(model.bias, torch.ones(3))
    torch.testing.assert_close(model.weight, weight * (1 - 0.1 * 0.5))


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="weight_decay_on='biases'"):
        build_optimizer({**ADAMW, "weight_decay_on": "biases"}, nn.Linear(2, 2))


def test_transformer_experiment_settings():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=pusht_lowdim_transformer"])
    assert cfg.denoiser._target_.endswith("DiffusionTransformer")
    assert (cfg.denoiser.n_layer, cfg.denoiser.n_head, cfg.denoiser.n_emb) == (8, 4, 256)
    assert (cfg.denoiser.p_drop_emb, cfg.denoiser.p_drop_attn) == (0.0, 0.01)
    assert cfg.optimizer.weight_decay == 1e-3 and cfg.optimizer.weight_decay_on == "matrices"
    assert cfg.optimizer.lr == 1e-4
    assert cfg.lr_scheduler.num_warmup_steps == 1000
