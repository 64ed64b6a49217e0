"""Exponential moving average (EMA) of a generator's weights, as basicsr's ``train.ema_decay``.

After every optimisation step the EMA copy moves towards the trained network::

    ema = decay * ema + (1 - decay) * weights      (trainable parameters; buffers are copied)

Validation and testing use the EMA copy: its weights average out the last few hundred steps'
noise, so a short run ends less dependent on where its last steps happened to land. It is saved
beside the trained weights in the same file (``params`` and ``params_ema``, basicsr's layout);
loaders prefer ``params_ema``, and a resumed run takes each back from its own key.

Frozen parameters (the VQGAN prior, and in stage 2 the IFRM) are shared with the trained network,
not copied: they never change, and a copy of the VQGAN would double the memory of the run.
"""
import copy

import torch

__all__ = ['ModelEMA']


class ModelEMA:
    """EMA of the trainable parameters of ``net`` (the bare network, not a DDP wrapper).

    Args:
        net: the trained network.
        decay: in [0, 1); basicsr's default for SR models is 0.999.
    """

    @staticmethod
    def check_decay(decay):
        """ValueError unless ``decay`` (``train:ema_decay``) is a number in [0, 1) (0: no EMA)."""
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f'ema_decay must be a number in [0, 1) (0: no EMA), got {decay!r}')

    def __init__(self, net, decay):
        self.check_decay(decay)
        self.decay = decay
        shared = {id(t): t for t in net.parameters() if not t.requires_grad}
        self.net = copy.deepcopy(net, memo=shared).eval()
        self._pairs = [(e, p) for (_, e), (_, p) in zip(self.net.named_parameters(), net.named_parameters())
                       if p.requires_grad]
        for ema_param, _ in self._pairs:
            ema_param.requires_grad_(False)
        self._buffers = list(zip(self.net.buffers(), net.buffers()))

    @torch.no_grad()
    def update(self):
        for ema_param, param in self._pairs:
            ema_param.lerp_(param.detach(), 1 - self.decay)
        for ema_buffer, buffer in self._buffers:
            ema_buffer.copy_(buffer)

    def state_dict(self):
        return self.net.state_dict()

    def load_state_dict(self, state_dict):
        self.net.load_state_dict(state_dict)
