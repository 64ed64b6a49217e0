"""How much of the VQGAN codebook is in use (stage 0 validation): perplexity and used fraction.

Not an image metric: the model gathers code indices over a validation set with
:class:`CodebookUsageAccumulator` and logs the result.

    perplexity    = exp(H(p)),  p = code frequencies, H in nats -> between 1 and n_embed; equals the
                    number of used codes when they are used equally often
    used_fraction = (#codes used at least once) / n_embed
"""
import math

import torch

__all__ = ['codebook_usage', 'usage_from_counts', 'CodebookUsageAccumulator']


def _count_codes(indices, n_embed):
    """Histogram of code indices. Any shape, any integer dtype (tensor or ndarray) -> (n_embed,) int64."""
    indices = torch.as_tensor(indices).reshape(-1)
    if indices.is_floating_point():
        raise TypeError(f'codebook indices must be integers, got dtype {indices.dtype}.')
    indices = indices.long().cpu()
    if indices.numel() and (indices.min() < 0 or indices.max() >= n_embed):
        raise ValueError(f'codebook indices must lie in [0, {n_embed - 1}], got range '
                         f'[{int(indices.min())}, {int(indices.max())}].')
    return torch.bincount(indices, minlength=n_embed)


def usage_from_counts(counts):
    """Usage statistics from a histogram of code counts.

    Args:
        counts (Tensor): (n_embed,) non-negative counts.

    Returns:
        dict: {'perplexity': float, 'used_fraction': float}; both 0 when nothing was counted.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    if total == 0:
        return {'perplexity': 0.0, 'used_fraction': 0.0}
    probs = counts[counts > 0] / total
    entropy = -(probs * probs.log()).sum()
    return {'perplexity': math.exp(float(entropy)), 'used_fraction': float((counts > 0).sum()) / counts.numel()}


def codebook_usage(indices, n_embed):
    """Perplexity and used fraction of the codes in ``indices``.

    Args:
        indices (Tensor | ndarray): integer code indices of any shape, e.g. (B, H/16, W/16).
        n_embed (int): codebook size (1024 for the f16 VQGAN).

    Returns:
        dict: {'perplexity': float, 'used_fraction': float}.
    """
    return usage_from_counts(_count_codes(indices, n_embed))


class CodebookUsageAccumulator:
    """Gathers code counts over many batches (e.g. a validation set).

    Example::

        usage = CodebookUsageAccumulator(n_embed=1024)
        for batch in loader:
            usage.update(indices)        # (B, h, w) integer codes
        log(usage.result())              # {'perplexity': ..., 'used_fraction': ...}
    """

    def __init__(self, n_embed):
        self.n_embed = n_embed
        self.counts = torch.zeros(n_embed, dtype=torch.long)

    def reset(self):
        self.counts.zero_()

    def update(self, indices):
        """Add the codes of one batch; indices of any shape."""
        self.counts += _count_codes(indices, self.n_embed)

    def result(self):
        """Usage statistics of everything added since construction or the last reset."""
        return usage_from_counts(self.counts)
