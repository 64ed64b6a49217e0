"""Invertible feature recovery module (IFRM) of VQIR.

The IFRM maps the quantised VQGAN features of an HR image, ``(B, 256, H/16, W/16)``, to a
viewable LR image ``(B, 3, H/s, W/s)`` (s = 16 or 32) and, in reverse, maps a stored LR back
to features that the VQGAN decoder can use. It is a stack of steps, each with
``forward(x, rev=False)``; the reverse runs the steps in the opposite order with ``rev=True``.

Only some steps are exact inverses of themselves:

* :class:`AffineCouplingLayer` — exactly invertible (up to floating-point rounding);
* :class:`InvertibleConv1x1` — exactly invertible (reverse uses the matrix inverse);
* :class:`HaarSqueeze` — exactly invertible (orthogonal Haar transform);
* :class:`ChannelProjection1x1` — NOT invertible: two independent 1x1 convolutions;
* :class:`GatedAttentionStep` — NOT invertible: two independent attention networks.

So the IFRM as a whole is only approximately invertible; training (stage 1) teaches the
non-invertible steps to undo each other. Parameter names equal the official checkpoints'
``icrm.*`` entries when an :class:`IFRM` is the ``icrm`` attribute of ``VQIR``.
"""
import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F


def _check_channels(x, expected, where):
    if x.dim() != 4 or x.shape[1] != expected:
        raise ValueError(f'{where}: expected input of shape (B, {expected}, H, W), got {tuple(x.shape)}')


class CouplingBottleneck(nn.Module):
    """Subnet of a coupling layer: 3x3 conv, LeakyReLU, 1x1 conv, LeakyReLU, 3x3 conv.

    ``(B, in_channels, H, W) -> (B, out_channels, H, W)``. The first two convolutions start
    as Xavier-normal x 0.1 and the last one at zero, so a fresh coupling layer is the identity
    (its scale is exp(0) = 1 and its shift 0), which keeps the deep stack stable early in training.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3):
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 1)
        self.conv3 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_normal_(conv.weight)
            with torch.no_grad():
                conv.weight.mul_(0.1)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)

    def forward(self, x):
        x = self.lrelu(self.conv1(x))
        x = self.lrelu(self.conv2(x))
        return self.conv3(x)


class AffineCouplingLayer(nn.Module):
    """Affine coupling layer with two half-steps (invertible).

    The channels are split into ``x1`` (first ``split_len1``) and ``x2`` (the rest). Forward::

        y1 = x1 * exp(c * (2 sigmoid(G2(x2)) - 1)) + H2(x2)
        y2 = x2 * exp(c * (2 sigmoid(G1(y1)) - 1)) + H1(y1)

    with clamp ``c`` (1.0): the log-scale is bounded to [-c, c]. The reverse solves these for
    ``x2`` then ``x1``. Shape preserving: ``(B, split_len1 + split_len2, H, W)``.
    """

    def __init__(self, split_len1, split_len2, kernel_size=3, clamp=1.0):
        super().__init__()
        self.split_len1 = split_len1
        self.split_len2 = split_len2
        self.clamp = clamp
        self.G1 = CouplingBottleneck(split_len1, split_len2, kernel_size)
        self.G2 = CouplingBottleneck(split_len2, split_len1, kernel_size)
        self.H1 = CouplingBottleneck(split_len1, split_len2, kernel_size)
        self.H2 = CouplingBottleneck(split_len2, split_len1, kernel_size)

    def _scale(self, log_scale_logits):
        return torch.exp(self.clamp * (torch.sigmoid(log_scale_logits) * 2 - 1))

    def forward(self, x, rev=False):
        _check_channels(x, self.split_len1 + self.split_len2, type(self).__name__)
        x1, x2 = x.split([self.split_len1, self.split_len2], dim=1)
        if not rev:
            y1 = x1 * self._scale(self.G2(x2)) + self.H2(x2)
            y2 = x2 * self._scale(self.G1(y1)) + self.H1(y1)
        else:
            y2 = (x2 - self.H1(x1)) / self._scale(self.G1(x1))
            y1 = (x1 - self.H2(y2)) / self._scale(self.G2(y2))
        return torch.cat((y1, y2), dim=1)


class InvertibleConv1x1(nn.Module):
    """Invertible 1x1 convolution (Glow), ``(B, C, H, W) -> (B, C, H, W)``.

    ``weight`` is a ``(C, C)`` matrix, initialised as a random orthogonal matrix (QR of a
    Gaussian). The reverse applies its inverse, computed in float64 for accuracy and cast to
    the input's dtype.

    While gradients are not being recorded for the weight (``torch.no_grad()`` or a frozen
    weight), the inverse is cached and reused as long as the weight is unchanged: same version
    counter, storage, device, dtype and values. The value check also catches edits through
    ``weight.data``, which bypass the version counter; it costs one (C, C) comparison. While
    training, the inverse is recomputed on every call so that gradients flow through it.
    """

    def __init__(self, num_channels):
        super().__init__()
        gaussian = torch.randn(num_channels, num_channels, dtype=torch.float64)
        orthogonal = torch.linalg.qr(gaussian)[0]
        self.weight = nn.Parameter(orthogonal.to(torch.float32))
        self.num_channels = num_channels
        self._inverse_cache = None  # (weight key, weight snapshot, inverse); not part of the state_dict

    def _compute_inverse(self):
        return torch.linalg.inv(self.weight.double()).to(self.weight.dtype)

    def _weight_key(self):
        weight = self.weight
        try:
            version = weight._version
        except RuntimeError:  # inference tensors have no version counter; the value check decides
            version = None
        return version, weight.data_ptr(), weight.device, weight.dtype

    def inverse_weight(self):
        """The ``(C, C)`` inverse of ``weight`` (cached outside training, see class docstring)."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._compute_inverse()
        key = self._weight_key()
        cache = self._inverse_cache
        if cache is not None and cache[0] == key and torch.equal(cache[1], self.weight):
            return cache[2]
        # normal (not inference-mode) tensors, so the cache stays usable after torch.inference_mode()
        with torch.inference_mode(False), torch.no_grad():
            inverse = self._compute_inverse()
            self._inverse_cache = (key, self.weight.detach().clone(), inverse)
        return inverse

    def forward(self, x, rev=False):
        _check_channels(x, self.num_channels, type(self).__name__)
        weight = self.inverse_weight() if rev else self.weight
        return F.conv2d(x, weight.to(x.dtype).view(self.num_channels, self.num_channels, 1, 1))


class ChannelProjection1x1(nn.Module):
    """Channel-changing 1x1 step (NOT invertible).

    Forward ``conv1``: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``; reverse ``conv2``:
    ``(B, out_channels, H, W) -> (B, in_channels, H, W)``. The two convolutions are separate,
    independently learned weights; ``conv2`` is not the (pseudo-)inverse of ``conv1``.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv2 = nn.Conv2d(out_channels, in_channels, 1)

    def forward(self, x, rev=False):
        if not rev:
            _check_channels(x, self.in_channels, type(self).__name__)
            return self.conv1(x)
        _check_channels(x, self.out_channels, f'{type(self).__name__} (reverse)')
        return self.conv2(x)


class AttentionResidualUnit(nn.Module):
    """``relu(x + conv1x1(relu(conv3x3(relu(conv1x1(x))))))`` with a ``hidden`` channel bottleneck."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class GatedAttentionBlock(nn.Module):
    """Simplified attention block of Cheng et al. (CVPR 2020): ``x + a(x) * sigmoid(b(x))``.

    ``a`` is three residual units, ``b`` three residual units and a 1x1 convolution that
    produces the gate. Shape preserving: ``(B, channels, H, W)``.
    """

    def __init__(self, channels, hidden):
        super().__init__()
        self.conv_a = nn.Sequential(*(AttentionResidualUnit(channels, hidden) for _ in range(3)))
        self.conv_b = nn.Sequential(*(AttentionResidualUnit(channels, hidden) for _ in range(3)),
                                    nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        return x + self.conv_a(x) * torch.sigmoid(self.conv_b(x))


class GatedAttentionStep(nn.Module):
    """Gated attention step of the IFRM (NOT invertible).

    The forward direction applies ``forw_att`` and the reverse direction a separate network
    ``back_att``; neither is the inverse of the other. Shape preserving: ``(B, channels, H, W)``.
    """

    def __init__(self, channels, hidden):
        super().__init__()
        self.channels = channels
        self.forw_att = GatedAttentionBlock(channels, hidden)
        self.back_att = GatedAttentionBlock(channels, hidden)

    def forward(self, x, rev=False):
        _check_channels(x, self.channels, type(self).__name__)
        return self.back_att(x) if rev else self.forw_att(x)


def haar_filters(channels):
    """The four 2x2 Haar filters (average, vertical, horizontal, diagonal detail) repeated for
    every channel: ``(4 * channels, 1, 2, 2)`` with entries +-1."""
    base = torch.tensor([[[1., 1.], [1., 1.]],
                         [[1., -1.], [1., -1.]],
                         [[1., 1.], [-1., -1.]],
                         [[1., -1.], [-1., 1.]]]).unsqueeze(1)
    return base.repeat(channels, 1, 1, 1)


class HaarSqueeze(nn.Module):
    """Haar wavelet squeeze (invertible): ``(B, C, H, W) -> (B, 4C, H/2, W/2)``.

    Each channel is split into its four Haar sub-bands (scaled by 1/4). Output channel
    ``k * C + c`` holds sub-band ``k`` of input channel ``c``. The filter matrix ``M`` satisfies
    ``M^T M = 4 I``, so the reverse (a transposed convolution with the same filters) is exact.
    ``haar_weights`` are fixed (requires_grad=False) but kept as a parameter so that the
    official 32x checkpoints, which contain them, load strictly. The step keeps no state
    between calls, so the reverse can run without a forward first.
    """

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.haar_weights = nn.Parameter(haar_filters(channels), requires_grad=False)

    def forward(self, x, rev=False):
        weights = self.haar_weights.to(x.dtype)
        if not rev:
            _check_channels(x, self.channels, type(self).__name__)
            b, _, h, w = x.shape
            if h % 2 or w % 2:
                raise ValueError(f'HaarSqueeze: height and width must be even, got {tuple(x.shape)}')
            out = F.conv2d(x, weights, stride=2, groups=self.channels) / 4.0
            out = out.reshape(b, self.channels, 4, h // 2, w // 2).transpose(1, 2)
            return out.reshape(b, 4 * self.channels, h // 2, w // 2)
        _check_channels(x, 4 * self.channels, f'{type(self).__name__} (reverse)')
        b, _, h, w = x.shape
        out = x.reshape(b, 4, self.channels, h, w).transpose(1, 2).reshape(b, 4 * self.channels, h, w)
        return F.conv_transpose2d(out, weights, stride=2, groups=self.channels)


def _coupling_triplet(channels):
    return [AffineCouplingLayer(channels // 2, channels // 2, 3) for _ in range(3)]


def _halving_block(channels, attention_hidden_divisor):
    """Halve the channels, mix them, gate them, then couple: returns (steps, new channel count)."""
    half = channels // 2
    steps = [ChannelProjection1x1(channels, half),
             InvertibleConv1x1(half),
             GatedAttentionStep(half, half // attention_hidden_divisor)]
    return steps + _coupling_triplet(half), half


def _max_halvings(in_channels, out_channels):
    """The most halvings that leave at least ``out_channels`` channels before the LR head's last step."""
    halvings = 1
    while halvings < 4 and in_channels // 2**(halvings + 2) >= out_channels:
        halvings += 1
    return halvings


@ARCH_REGISTRY.register()
class IFRM(nn.Module):
    """Invertible feature recovery module for 16x or 32x rescaling.

    ``forward(x)``: features ``(B, in_channels, h, w)`` -> LR ``(B, out_channels, h', w')``;
    ``forward(lr, rev=True)``: LR -> features. With VQGAN features at h = H/16, the LR is
    H/16 for ``ir_scale=16`` (h' = h) and H/32 for ``ir_scale=32`` (h' = h/2, via a Haar squeeze).

    Layout (C = in_channels, 256 in the official models):

    * ``operations``: 3 coupling layers at C; then ``halvings`` (4) halving blocks C -> C/16, each
      ``ChannelProjection1x1 -> InvertibleConv1x1 -> GatedAttentionStep -> 3 coupling layers``.
      For 32x: then ``HaarSqueeze`` (C/16 -> C/4 channels, spatial /2), ``InvertibleConv1x1``,
      3 coupling layers, and two more halving blocks back to C/16.
    * ``inpfeat_extraction``: ``ChannelProjection1x1`` C/16 -> C/32, ``InvertibleConv1x1``,
      ``GatedAttentionStep``, ``ChannelProjection1x1`` C/32 -> out_channels.

    The gated attention blocks use C'/2 hidden channels for 16x and C' for 32x (as in the
    official checkpoints). ``in_channels`` must be a multiple of 64.

    ``halvings``: channel-halving blocks before the LR head (4, the official layout: 256 -> 16).
    The head's last step is a 1x1 convolution from C/2**(halvings+1) channels to the LR's: with
    fewer channels than the LR has, every LR pixel lies on a plane (or a line) of RGB, whatever
    the photo's colour; such a configuration logs a warning. Codes of 64 channels need at most 3
    halvings (the demo's IFRM: 1, 64 -> 32 channels, head 32 -> 16 -> 3).
    """

    def __init__(self, in_channels=256, out_channels=3, ir_scale=16, halvings=4):
        super().__init__()
        if ir_scale not in (16, 32):
            raise ValueError(f'IFRM: ir_scale must be 16 or 32, got {ir_scale}')
        if in_channels <= 0 or in_channels % 64:
            raise ValueError(f'IFRM: in_channels must be a positive multiple of 64, got {in_channels}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.ir_scale = ir_scale
        if halvings not in range(1, 5):
            raise ValueError(f'IFRM: halvings must be 1 to 4, got {halvings!r}')
        head_channels = in_channels // 2**(halvings + 1)
        if head_channels < out_channels:
            get_root_logger().warning(
                f'IFRM: {in_channels} input channels halved {halvings} times leave {head_channels} channels before the '
                f'{out_channels}-channel LR: every LR pixel lies in a {head_channels}-dimensional subspace of its '
                f'colours; set halvings to at most {_max_halvings(in_channels, out_channels)}')
        attention_hidden_divisor = 2 if ir_scale == 16 else 1

        channels = in_channels
        operations = _coupling_triplet(channels)
        for _ in range(halvings):
            steps, channels = _halving_block(channels, attention_hidden_divisor)
            operations += steps
        if ir_scale == 32:
            operations.append(HaarSqueeze(channels))
            channels *= 4
            operations.append(InvertibleConv1x1(channels))
            operations += _coupling_triplet(channels)
            for _ in range(2):
                steps, channels = _halving_block(channels, attention_hidden_divisor)
                operations += steps
        self.operations = nn.ModuleList(operations)

        half = channels // 2
        self.inpfeat_extraction = nn.ModuleList([
            ChannelProjection1x1(channels, half),
            InvertibleConv1x1(half),
            GatedAttentionStep(half, half // attention_hidden_divisor),
            ChannelProjection1x1(half, out_channels),
        ])

    def forward(self, x, rev=False):
        """Features -> LR (``rev=False``) or LR -> features (``rev=True``); see class docstring."""
        if not rev:
            _check_channels(x, self.in_channels, 'IFRM')
            for step in self.operations:
                x = step(x, rev=False)
            for step in self.inpfeat_extraction:
                x = step(x, rev=False)
        else:
            _check_channels(x, self.out_channels, 'IFRM (reverse)')
            for step in reversed(self.inpfeat_extraction):
                x = step(x, rev=True)
            for step in reversed(self.operations):
                x = step(x, rev=True)
        return x
