"""Dead-code restarts for VQGAN training (stage 0).

A VQGAN trained from scratch tends to use a handful of its codes: taming initialises the codebook
uniformly in +-1/n_embed, far from the encoder's outputs, so the few codes that win at first get
all the codebook gradients and the rest never move (the demo's VQGAN used 4-9 of 256 codes
without restarts). The usual remedy (Dhariwal et al., Jukebox, 2020; Zeghidour et al.,
SoundStream, 2021) is applied here: every ``interval`` iterations, each code that no position
chose since the last check is replaced by an encoder output of the current batch, picked at
random, so it starts where the data are.

Under DDP the hit counts are summed over processes and process 0's choice is broadcast, so all
replicas keep one codebook. The counts of a partial interval are part of the training state
(``state_dict`` sums them over processes; after a resume process 0 holds the sum, the others
start from zero), so a resumed run checks at the same iterations as an uninterrupted one.
"""
import torch
from torch import distributed as dist

from vqir.utils.dist import is_distributed
from vqir.utils.checkpoint import CheckpointError
from vqir.utils.options import OptionsError

__all__ = ['DeadCodeRestart']


def check_restart_interval(interval):
    """ValueError unless ``interval`` (``train:codebook_restart_every``) is a positive integer."""
    if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
        raise ValueError(f'codebook_restart_every must be a positive integer, got {interval!r}')


class DeadCodeRestart:
    """Counts code hits and re-initialises unused codes.

    Args:
        quantizer: the :class:`vqir.archs.vqgan_arch.VectorQuantizer` (without ``remap``).
        interval: iterations between checks (positive).
    """

    def __init__(self, quantizer, interval):
        try:
            check_restart_interval(interval)
        except ValueError as err:
            raise OptionsError(str(err)) from None
        if quantizer.remap is not None:
            raise OptionsError('codebook_restart_every cannot be used with a remapped codebook (remap)')
        self.quantizer = quantizer
        self.interval = interval
        self.hits = None
        self.iterations = 0

    @torch.no_grad()
    def update(self, z, indices):
        """Record one training step; returns how many codes were restarted (0 between checks).

        z: the quantiser's input of the step ``(B, e_dim, h, w)``; indices: the codes it chose
        (any shape, ``B*h*w`` entries).
        """
        weight = self.quantizer.embedding.weight
        counts = torch.bincount(indices.reshape(-1), minlength=weight.shape[0])
        self.hits = counts if self.hits is None else self.hits + counts
        self.iterations += 1
        if self.iterations < self.interval:
            return 0
        hits, self.hits, self.iterations = self.hits, None, 0
        if is_distributed():
            dist.all_reduce(hits)
        dead = torch.nonzero(hits == 0).flatten()
        if dead.numel() == 0:
            return 0
        vectors = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        picks = torch.randint(vectors.shape[0], (dead.numel(), ), device=vectors.device)
        weight[dead] = vectors[picks].to(weight.dtype)
        if is_distributed():
            dist.broadcast(weight, src=0)
        return int(dead.numel())

    @torch.no_grad()
    def state_dict(self):
        """The partial interval: ``{'iterations', 'hits'}`` (hits summed over processes, on the CPU, or
        None). Under DDP every process must call it (the sum is a collective operation)."""
        hits = self.hits
        if is_distributed():
            hits = torch.zeros_like(self.quantizer.embedding.weight[:, 0], dtype=torch.long) if hits is None else hits
            hits = hits.clone()
            dist.all_reduce(hits)
        return {'iterations': self.iterations, 'hits': None if hits is None else hits.cpu()}

    def load_state_dict(self, state):
        """Continue a partial interval; only process 0 takes the (summed) counts."""
        self.iterations = int(state['iterations'])
        hits = state['hits']
        if hits is not None and hits.numel() != self.quantizer.embedding.weight.shape[0]:
            raise CheckpointError(f'codebook restart state counts {hits.numel()} codes, the codebook has '
                                  f'{self.quantizer.embedding.weight.shape[0]}')
        if hits is not None:
            hits = hits.to(self.quantizer.embedding.weight.device)
            if is_distributed() and dist.get_rank() != 0:
                hits = torch.zeros_like(hits)
        self.hits = hits
