"""Time-series diffusion transformer: the paper's DP-T denoiser."""

from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.denoisers.layers import SinusoidalStepEmbedding


class DiffusionTransformer(nn.Module):
    """A decoder over noisy action tokens that cross-attends to the step and observation tokens.

    Each of the ``horizon`` noisy actions is one token. The condition is a short sequence, the
    memory: the diffusion-step embedding followed by one token per observation frame, each with a
    learned position embedding, passed through an MLP (or ``n_cond_layers`` encoder layers).
    Decoder layers (pre-norm, GELU) apply self-attention over the action tokens, causal by
    default, and cross-attention to the memory. Action token ``t`` sees the step token and the
    observation frames ``0..t`` (the paper's time-causal ``obs_as_cond`` mask): the horizon
    starts at the first observed frame, so action ``t`` is conditioned on no later frame.

    Args:
        action_dim: Size of one action (input and output features of a token).
        cond_dim: Size of one observation frame's features.
        horizon: Number of action tokens.
        n_obs_steps: Number of observation frames (condition tokens besides the step).
        n_layer: Decoder layers.
        n_head: Attention heads.
        n_emb: Token embedding size.
        p_drop_emb: Dropout on the token and condition embeddings.
        p_drop_attn: Dropout inside the attention and feed-forward blocks.
        causal_attn: Mask self-attention so action ``t`` sees only actions ``<= t``, and
            cross-attention so it sees only observation frames ``<= t``.
        n_cond_layers: Transformer encoder layers over the condition tokens; 0 uses an MLP.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        n_obs_steps: int = 1,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.01,
        causal_attn: bool = True,
        n_cond_layers: int = 0,
    ) -> None:
        super().__init__()
        if n_emb % n_head != 0:
            raise ValueError(f"n_emb={n_emb} must be divisible by n_head={n_head}")
        if horizon < 1 or n_obs_steps < 1:
            raise ValueError(f"horizon={horizon} and n_obs_steps={n_obs_steps} must be >= 1")
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        n_cond_tokens = 1 + n_obs_steps  # step token + one token per observation frame

        # Action tokens.
        self.input_emb = nn.Linear(action_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.drop = nn.Dropout(p_drop_emb)

        # Pre-norm GELU layers, shared by the condition encoder and the decoder.
        layer_kwargs = {
            "d_model": n_emb,
            "nhead": n_head,
            "dim_feedforward": 4 * n_emb,
            "dropout": p_drop_attn,
            "activation": "gelu",
            "batch_first": True,
            "norm_first": True,
        }

        # Condition tokens (the decoder's memory).
        self.step_emb = SinusoidalStepEmbedding(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, n_cond_tokens, n_emb))
        if n_cond_layers > 0:
            layer = nn.TransformerEncoderLayer(**layer_kwargs)
            self.cond_encoder: nn.Module = nn.TransformerEncoder(
                layer, num_layers=n_cond_layers, enable_nested_tensor=False
            )
        else:
            self.cond_encoder = nn.Sequential(
                nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb)
            )

        layer = nn.TransformerDecoderLayer(**layer_kwargs)
        self.decoder = nn.TransformerDecoder(layer, num_layers=n_layer)

        # Boolean masks, True = may NOT attend (torch's convention). Not saved in checkpoints:
        # they follow from the constructor arguments.
        if causal_attn:
            t = torch.arange(horizon)
            s = torch.arange(n_cond_tokens)
            self_mask = t[None, :] > t[:, None]  # (T, T): key position after query position
            # Memory token s >= 1 is observation frame s - 1; token 0 (the step) is always seen.
            cross_mask = (s[None, :] - 1) > t[:, None]  # (T, 1 + To)
            self.register_buffer("self_mask", self_mask, persistent=False)
            self.register_buffer("cross_mask", cross_mask, persistent=False)
        else:
            self.register_buffer("self_mask", None, persistent=False)
            self.register_buffer("cross_mask", None, persistent=False)

        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-style initialization: N(0, 0.02) weights, zero biases, identity layer norms."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, name) is not None:
                    nn.init.normal_(getattr(module, name), std=0.02)
            for name in ("in_proj_bias", "bias_k", "bias_v"):
                if getattr(module, name) is not None:
                    nn.init.zeros_(getattr(module, name))
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """Predicts the noise (or the clean sample) for a noisy action sequence.

        Args:
            sample: Noisy actions, (B, T, Da).
            timestep: Diffusion steps, (B,) or a scalar.
            cond: Observation features, one token per frame, (B, To, cond_dim).

        Returns:
            The model output, (B, T, Da).
        """
        B = sample.shape[0]
        if sample.shape[1] != self.horizon or cond.shape[1] != self.n_obs_steps:
            raise ValueError(
                f"expected {self.horizon} action tokens and {self.n_obs_steps} observation "
                f"frames, got sample {tuple(sample.shape)} and cond {tuple(cond.shape)}"
            )
        timestep = torch.as_tensor(timestep, device=sample.device).expand(B)

        step = self.step_emb(timestep).unsqueeze(1)  # (B, 1, E)
        memory = torch.cat([step, self.cond_obs_emb(cond)], dim=1)  # (B, 1 + To, E)
        memory = self.cond_encoder(self.drop(memory + self.cond_pos_emb))

        x = self.drop(self.input_emb(sample) + self.pos_emb)  # (B, T, E)
        x = self.decoder(
            tgt=x,
            memory=memory,
            tgt_mask=self.self_mask,
            memory_mask=self.cross_mask,
            # Said rather than detected: torch's check compares the mask on the host each call
            # (a GPU sync, which a CUDA graph capture refuses).
            tgt_is_causal=self.self_mask is not None,
        )
        return self.head(self.ln_f(x))  # (B, T, Da)
