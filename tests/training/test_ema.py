import torch
from torch import nn

from diffusion_policy.training.ema import EMA


def test_decay_follows_warmup_schedule():
    ema = EMA(nn.Linear(2, 2), power=0.75, max_value=0.9999)
    decays = []
    for _ in range(5):
        decays.append(ema.decay())
        ema.step += 1
    assert decays[:2] == [0.0, 0.0]
    assert abs(decays[2] - (1 - 2**-0.75)) < 1e-12
    assert all(a < b for a, b in zip(decays[2:], decays[3:], strict=False))
    ema.step = 10**9
    assert ema.decay() == 0.9999


def test_update_averages_parameters_and_copies_buffers():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model)
    ema.step = 3  # decay = 1 - 3 ** -0.75
    decay = ema.decay()
    before = ema.model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model)
    expected = decay * before + (1 - decay) * model[0].weight
    torch.testing.assert_close(ema.model[0].weight, expected)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    assert ema.step == 4


def test_first_update_copies_weights():
    model = nn.Linear(2, 2)
    ema = EMA(model)
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update(model)  # decay 0 at the first step
    torch.testing.assert_close(ema.model.weight, model.weight)


def test_state_dict_round_trip():
    model = nn.Linear(2, 2)
    ema = EMA(model)
    ema.update(model)
    other = EMA(nn.Linear(2, 2))
    other.load_state_dict(ema.state_dict())
    assert other.step == 1
    torch.testing.assert_close(other.model.weight, ema.model.weight)
