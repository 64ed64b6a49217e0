"""VQIRBaseModel's step: ``train.grad_clip_norm`` clips the gradient (keeping its direction), a
non-finite gradient skips the step and ``train.max_bad_steps`` of them in a row stop the run.
(Non-finite losses through a whole training run: tests/pipelines/test_reliability_training.py.)"""
import pytest
import torch
from torch import nn

from vqir.models.base_model import NonFiniteLossError, VQIRBaseModel


def _bare_model(**train):
    return VQIRBaseModel({'num_gpu': 0, 'is_train': True, 'dist': False, 'train': train, 'path': {'models': 'm'}})


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    net(x).pow(2).mul(100).sum().backward()
    unclipped = torch.cat([p.grad.flatten() for p in net.parameters()])
    net.zero_grad()
    assert unclipped.norm() > 10

    for clip, expected_norm in ((0.5, 0.5), (None, float(unclipped.norm()))):
        model = _bare_model(grad_clip_norm=clip)
        start = [p.detach().clone() for p in net.parameters()]
        optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
        assert model.backward_and_step(net(x).pow(2).mul(100).sum(), optimizer, list(net.parameters()), 'net')
        grad = torch.cat([p.grad.flatten() for p in net.parameters()])
        update = torch.cat([(s - p.detach()).flatten() for s, p in zip(start, net.parameters())])
        assert float(grad.norm()) == pytest.approx(expected_norm, rel=1e-4)
        torch.testing.assert_close(update, grad)  # SGD, lr 1: the step is the (clipped) gradient
        torch.testing.assert_close(grad / grad.norm(), unclipped / unclipped.norm())  # direction kept
        with torch.no_grad():
            for s, p in zip(start, net.parameters()):
                p.copy_(s)


def test_non_finite_gradient_skips_the_step_and_stops_after_the_limit():
    model = _bare_model(max_bad_steps=2)
    net = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    start = [p.detach().clone() for p in net.parameters()]

    def finite_loss_with_nan_gradient():
        return (net.weight * 0).sqrt().sum()  # d sqrt(u)/du at 0 is inf; times 0 gives NaN

    loss = finite_loss_with_nan_gradient()
    assert torch.isfinite(loss)
    assert model.backward_and_step(loss, optimizer, list(net.parameters()), 'net') is False
    assert all(torch.equal(s, p) for s, p in zip(start, net.parameters()))
    assert all(p.grad is None for p in net.parameters())
    # a good step in between resets the count
    assert model.backward_and_step(net(torch.ones(1, 3)).sum(), optimizer, list(net.parameters()), 'net')
    model.step_succeeded()
    assert model.backward_and_step(finite_loss_with_nan_gradient(), optimizer, list(net.parameters()), 'net') is False
    with pytest.raises(NonFiniteLossError, match='2 consecutive steps with a non-finite gradient of net'):
        model.backward_and_step(finite_loss_with_nan_gradient(), optimizer, list(net.parameters()), 'net')
