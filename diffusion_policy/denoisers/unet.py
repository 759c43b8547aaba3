"""Temporal 1-D convolutional UNet with FiLM conditioning: the paper's DP-C denoiser."""

from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.denoisers.layers import StepEncoder
from diffusion_policy.denoisers.temporal_conv import TemporalConv1d

__all__ = ["ConditionalUnet1D", "ConvBlock", "FiLMResBlock", "TemporalConv1d"]


class ConvBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, keeping the sequence length."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int) -> None:
        super().__init__(
            TemporalConv1d(in_ch, out_ch, kernel_size),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )


class FiLMResBlock(nn.Module):
    """Two conv blocks; the condition scales and shifts the first block's output (FiLM).

    ``self.film`` maps the condition to the scale and shift; the parent computes it (once for
    all blocks, see :meth:`ConditionalUnet1D.film_condition`) and passes the result in.
    """

    def __init__(
        self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int
    ) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_ch, out_ch, kernel_size, n_groups)
        self.conv2 = ConvBlock(out_ch, out_ch, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_ch))
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, T), film: ``self.film`` of the condition (B, 2 * C_out) -> (B, C_out, T)."""
        # Sliced at a constant channel: an exported graph then computes no split point per call.
        film = film.unsqueeze(-1)
        scale, shift = film[:, : self.out_ch], film[:, self.out_ch :]  # (B, C_out, 1) each
        h = self.conv1(x) * scale + shift
        return self.conv2(h) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """UNet over the action sequence, conditioned on the diffusion step and observation features.

    The sequence is downsampled by 2 at every level but the last, so the horizon must be a
    multiple of ``2 ** (len(down_dims) - 1)``.

    Args:
        action_dim: Size of one action (input and output channels).
        cond_dim: Size of one observation frame's features.
        horizon: Length of the denoised action sequence; checked against the downsampling.
        n_obs_steps: Observation frames; their features are flattened into one global
            condition of size ``n_obs_steps * cond_dim``.
        down_dims: Channels of each level.
        kernel_size: Temporal convolution kernel size.
        n_groups: GroupNorm groups.
        step_embed_dim: Size of the diffusion-step embedding.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        n_obs_steps: int = 1,
        down_dims: tuple[int, ...] | list[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 256,
    ) -> None:
        super().__init__()
        down_dims = list(down_dims)
        factor = 2 ** (len(down_dims) - 1)
        if horizon % factor != 0:
            raise ValueError(
                f"horizon={horizon} must be a multiple of {factor}, the UNet's downsampling "
                f"factor for down_dims={down_dims} ({len(down_dims)} levels)"
            )
        for d in down_dims:
            if d % n_groups != 0:
                raise ValueError(f"down_dims entry {d} is not divisible by n_groups={n_groups}")

        self.step_encoder = StepEncoder(step_embed_dim)
        film_dim = step_embed_dim + n_obs_steps * cond_dim

        def block(i: int, o: int) -> FiLMResBlock:
            return FiLMResBlock(i, o, film_dim, kernel_size, n_groups)

        dims = [action_dim, *down_dims]
        self.down = nn.ModuleList()
        for level, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            last = level == len(down_dims) - 1
            resample = nn.Identity() if last else nn.Conv1d(d_out, d_out, 3, stride=2, padding=1)
            self.down.append(nn.ModuleList([block(d_in, d_out), block(d_out, d_out), resample]))

        self.mid = nn.ModuleList([block(down_dims[-1], down_dims[-1]) for _ in range(2)])

        self.up = nn.ModuleList()
        for d_out, d_in in reversed(list(zip(down_dims[:-1], down_dims[1:], strict=True))):
            # d_in: channels coming up; concatenated with the skip of the same width.
            resample = nn.ConvTranspose1d(d_out, d_out, 4, stride=2, padding=1)
            self.up.append(nn.ModuleList([block(2 * d_in, d_out), block(d_out, d_out), resample]))

        self.head = nn.Sequential(
            ConvBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )
        # The FiLM blocks in the order forward() runs them, and the size of each one's FiLM.
        self.film_blocks = [m for m in self.modules() if isinstance(m, FiLMResBlock)]
        self.film_sizes = [b.film[-1].out_features for b in self.film_blocks]

    def film_condition(self, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Every block's FiLM scale and shift, from the step embedding and observation features.

        Sampling computes it for all its steps in one call, before the denoising loop, and
        passes each step's row to :meth:`forward` as ``film``; so a call at batch 1 reads the
        convolutions' weights only.

        Args:
            timestep: Diffusion steps, (B,) or a scalar.
            cond: Observation features, (B, To, cond_dim) or (B, To * cond_dim).

        Returns:
            (B, sum of 2 * C_out over the blocks), the blocks' FiLM outputs concatenated.
        """
        timestep = torch.as_tensor(timestep, device=cond.device).expand(cond.shape[0])
        c = torch.cat([self.step_encoder(timestep), cond.flatten(1)], dim=-1)  # (B, film_dim)
        return torch.cat([block.film(c) for block in self.film_blocks], dim=-1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        film: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicts the noise (or the clean sample) for a noisy action sequence.

        Args:
            sample: Noisy actions, (B, T, Da).
            timestep: Diffusion steps, (B,) or a scalar.
            cond: Observation features, (B, To, cond_dim), or already flattened (B, To * cond_dim).
            film: :meth:`film_condition` of ``timestep`` and ``cond`` when already computed;
                then ``timestep`` and ``cond`` are not read.

        Returns:
            The model output, (B, T, Da).
        """
        if film is None:
            film = self.film_condition(timestep, cond)  # (B, sum of 2 * C_out)
        films = iter(film.split(self.film_sizes, dim=-1))  # in the blocks' order

        x = sample.transpose(1, 2).contiguous()  # (B, Da, T)
        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, next(films)), next(films))
            skips.append(x)
            x = downsample(x)
        for res in self.mid:
            x = res(x, next(films))
        for res1, res2, upsample in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(res2(res1(x, next(films)), next(films)))
        return self.head(x).transpose(1, 2)  # (B, T, Da)
