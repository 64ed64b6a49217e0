"""The EMA of a generator's weights (train.ema_decay)."""
import pytest
import torch
from torch import nn

from vqir.models.ema import ModelEMA


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))
    for p in net[0].parameters():
        p.requires_grad_(False)  # a frozen part, as the VQGAN in stages 1 and 2
    return net


def test_update_is_the_moving_average_of_the_trained_parameters():
    net = _net()
    ema = ModelEMA(net, decay=0.9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net[2].parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update()
    averaged = ema.state_dict()
    for name in ('2.weight', '2.bias'):
        torch.testing.assert_close(averaged[name], 0.9 * start[name] + 0.1 * net.state_dict()[name])
    assert torch.equal(averaged['1.running_mean'], net[1].running_mean)  # buffers are copied
    assert averaged['0.weight'] is not None and ema.net[0].weight is net[0].weight  # frozen: shared, not copied
    assert all(not p.requires_grad for p in ema.net.parameters())


def test_decay_must_be_below_one():
    with pytest.raises(ValueError, match=r'ema_decay must be a number in \[0, 1\)'):
        ModelEMA(_net(), decay=1.0)
