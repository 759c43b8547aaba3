"""Exponential moving average of a model's weights, on the paper's warm-up schedule."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps an averaged copy of a model; the copy is what gets evaluated and rolled out.

    The decay grows with the number of updates as ``1 - (1 + step / inv_gamma) ** -power``,
    clipped to ``[min_value, max_value]``, so early weights are forgotten quickly.

    Args:
        model: The model being trained; it is deep-copied.
        power: Exponent of the warm-up (0.75 in the paper).
        inv_gamma: Step scale of the warm-up.
        min_value: Smallest decay.
        max_value: Largest decay (0.9999 in the paper).
        update_after_step: Updates before this count copy the weights instead of averaging.
    """

    def __init__(
        self,
        model: nn.Module,
        power: float = 0.75,
        inv_gamma: float = 1.0,
        min_value: float = 0.0,
        max_value: float = 0.9999,
        update_after_step: int = 0,
    ) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power = power
        self.inv_gamma = inv_gamma
        self.min_value = min_value
        self.max_value = max_value
        self.update_after_step = update_after_step
        self.step = 0

    def decay(self) -> float:
        """The decay used by the next update."""
        step = self.step - self.update_after_step - 1
        if step <= 0:
            return 0.0
        value = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return min(max(value, self.min_value), self.max_value)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the averaged weights towards ``model``'s; buffers and frozen weights are copied."""
        decay = self.decay()
        averaged, copied_src, copied_dst = [], [], []
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            if param.requires_grad:
                averaged.append((ema_params[name], param))
            else:
                copied_dst.append(ema_params[name])
                copied_src.append(param)
        ema_buffers = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():
            copied_dst.append(ema_buffers[name])
            copied_src.append(buf)

        if averaged:
            dst, src = zip(*averaged, strict=True)
            # ema <- ema + (1 - decay) * (param - ema)
            torch._foreach_lerp_(list(dst), list(src), 1.0 - decay)
        for d, s in zip(copied_dst, copied_src, strict=True):
            d.copy_(s)
        self.step += 1

    def state_dict(self) -> dict:
        """Averaged weights and the update count."""
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])
