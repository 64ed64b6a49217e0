"""VQGAN (Esser et al., "Taming Transformers"), compatible with taming-transformers checkpoints.

The frozen generative prior of VQIR. Parameter names, shapes and order are those of taming's
``VQModel`` (``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv.*``,
``post_quant_conv.*``), so a taming ``.ckpt`` or the reference VQIR ``.pth`` loads strictly.

Shapes for the f16 configuration (ch 128, ch_mult [1, 1, 2, 2, 4], z_channels = embed_dim = 256):

    image (B, 3, H, W) in [-1, 1]
      -> encoder -> (B, 256, H/16, W/16) -> quant_conv -> nearest of 1024 codes -> z_q
      -> post_quant_conv -> decoder -> (B, 3, H, W)   (+ features 'Level_1', 'Level_2', 'Level_4', ...)
"""
import numpy as np
import torch
import torch.nn.functional as F
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

__all__ = [
    'NORM_GROUPS', 'Normalize', 'warn_if_single_channel_groups', 'swish', 'ResnetBlock', 'AttnBlock', 'Downsample',
    'Upsample', 'Encoder', 'Decoder', 'BlockColourPath',
    'VectorQuantizer', 'VQGAN'
]


NORM_GROUPS = 32  # taming's layout: every GroupNorm of its VQGAN has 32 groups


def Normalize(in_channels, num_groups=NORM_GROUPS):  # noqa: N802  (taming's name, kept for familiarity)
    """GroupNorm (32 groups in taming's VQGAN).

    With one channel a group (e.g. 32 channels, 32 groups) it is an instance normalisation:
    the decoder's last one then sets each channel's image mean to its bias, so the colour of the
    input cannot reach the output. Small networks need fewer groups (``norm_groups``).
    """
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f'GroupNorm: the number of groups must be a positive integer, got {num_groups!r}')
    if in_channels % num_groups:
        raise ValueError(f'GroupNorm: {in_channels} channels cannot be split into {num_groups} groups')
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def warn_if_single_channel_groups(ch, ch_mult, norm_groups, owner, norm_out_groups=None):
    """Log a warning when some level's GroupNorms hold one channel a group (see ``Normalize``), or the
    decoder's last one does (``norm_out_groups``; it works on ``ch * ch_mult[0]`` channels): that one
    decides the colour of the output."""
    logger = get_root_logger()
    narrowest = ch * min(ch_mult)
    if narrowest <= norm_groups:
        logger.warning(
            f'{owner}: {narrowest} channels in {norm_groups} GroupNorm groups is one channel a group, an instance '
            'normalisation: the decoder cannot pass the colour of its input to its output. Use at least 4 channels '
            f'a group (e.g. norm_groups: {max(narrowest // 4, 1)}) unless you load weights trained this way.')
    out_channels = ch * ch_mult[0]
    if norm_out_groups is not None and out_channels <= norm_out_groups:
        logger.warning(
            f'{owner}: {out_channels} channels in {norm_out_groups} groups of the decoder\'s last GroupNorm '
            '(norm_out_groups) is one channel a group: it sets every channel\'s mean to its bias, so the output '
            'cannot keep the colour of the input. Use fewer groups (e.g. norm_out_groups: 1) unless you load '
            'weights trained this way.')


def swish(x):
    """x * sigmoid(x) (SiLU), the VQGAN non-linearity."""
    return F.silu(x)


def _subpixel_weight(weight):
    """3x3 kernel ``(Co, Ci, 3, 3)`` -> the four 2x2 kernels ``(4 Co, Ci, 2, 2)`` that give the 3x3 conv
    of a nearest-upsampled map phase by phase (output rows/columns 2i + p, phases p = (py, px) in
    row-major order).

    Along one axis, output 2i + 0 reads input rows i - 1, i, i (kernel rows 0, 1, 2): taps
    [w0, w1 + w2] on input rows (i - 1, i); output 2i + 1 reads i, i, i + 1: [w0 + w1, w2] on (i, i + 1).
    """
    rows = (torch.stack([weight[:, :, 0], weight[:, :, 1] + weight[:, :, 2]], dim=2),
            torch.stack([weight[:, :, 0] + weight[:, :, 1], weight[:, :, 2]], dim=2))
    phases = []
    for row in rows:  # (Co, Ci, 2, 3)
        phases.append(torch.stack([row[..., 0], row[..., 1] + row[..., 2]], dim=-1))
        phases.append(torch.stack([row[..., 0] + row[..., 1], row[..., 2]], dim=-1))
    return torch.cat(phases, dim=0)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv. (B, C, H, W) -> (B, C, 2H, 2W).

    With the conv, the result is computed without building the upsampled map: each of the four
    output phases is a 2x2 conv of the (zero-padded) input (see ``_subpixel_weight``), 16 instead
    of 36 multiply-adds per input pixel and channel pair. ``_forward_upsampled`` is the textbook
    order (interpolate, then conv); the two agree to float rounding.
    """

    def __init__(self, in_channels, with_conv=True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        if not self.with_conv:
            return F.interpolate(x, scale_factor=2.0, mode='nearest')
        b, _, h, w = x.shape
        c = self.conv.out_channels
        weight = _subpixel_weight(self.conv.weight).to(x.dtype)
        bias = self.conv.bias.repeat(4).to(x.dtype)
        # phase (py, px) of output pixel (2i + py, 2j + px) is entry (i + py, j + px) of its own channel block
        out = F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias).unflatten(1, (2, 2, c))
        y = out.new_empty((b, c, h, 2, w, 2))  # viewed as (B, C, 2H, 2W)
        for py in range(2):
            for px in range(2):
                y[:, :, :, py, :, px] = out[:, py, px, :, py:py + h, px:px + w]
        return y.view(b, c, 2 * h, 2 * w)

    def _forward_upsampled(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode='nearest')
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """2x downsampling. (B, C, H, W) -> (B, C, H/2, W/2).

    With a conv it pads one zero row/column at the bottom/right and applies a stride-2 3x3 conv
    without padding (taming's asymmetric layout, needed to reproduce its weights' behaviour);
    otherwise 2x2 average pooling.
    """

    def __init__(self, in_channels, with_conv=True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode='constant', value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GN-swish-conv3x3 (+ time embedding) GN-swish-dropout-conv3x3, plus skip.

    ``temb_proj`` exists only when ``temb_channels > 0`` (the reference's refinement module builds
    its blocks with 512 and never passes an embedding); ``nin_shortcut`` (1x1) only when the channel
    count changes. (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels, out_channels=None, dropout=0.0, temb_channels=0, norm_groups=NORM_GROUPS):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels

        self.norm1 = Normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x, temb=None):
        """x: (B, in_channels, H, W); temb: optional (B, temb_channels)."""
        # without autograd the activations and the sum can overwrite their fresh inputs: at full
        # resolution each avoided temporary is a C x H x W map
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if temb is not None:
            h = h + self.temb_proj(swish(temb))[:, :, None, None]
        # two statements, so that conv1's output is freed before conv2 allocates (at most three
        # maps of this size live at once: x, conv2's input and its output)
        h = self.dropout(F.silu(self.norm2(h), inplace=inplace))
        h = self.conv2(h)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return h.add_(x) if inplace else x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, with a residual connection.

    q, k, v and proj_out are 1x1 convs (taming's parameter layout). The forward pass runs q, k, v
    as one matrix product on the token-major view and calls the fused
    ``F.scaled_dot_product_attention``, so the (HW x HW) attention matrix is not stored where a
    fused kernel exists. With C = 512 (the f16 VQGAN) the head is too wide for flash kernels; on
    CUDA the memory-efficient kernel runs, e.g. 0.2 GB instead of 2.2 GB at 128x128 positions in
    float32. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, in_channels, norm_groups=NORM_GROUPS):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels, norm_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        b, c, h, w = x.shape
        # (B, HW, C): channels last so that q/k/v come out with contiguous feature rows
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).view(3 * c, c)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, weight, bias).unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + out.transpose(1, 2).unflatten(2, (h, w))

    def _forward_explicit(self, x):
        """Textbook version (explicit softmax(q k^T / sqrt(C)) v); kept to test ``forward`` against."""
        b, c, h, w = x.shape
        h_ = self.norm(x)
        q = self.q(h_).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        k = self.k(h_).reshape(b, c, h * w)  # (B, C, HW)
        v = self.v(h_).reshape(b, c, h * w)  # (B, C, HW)
        attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (B, HW_q, HW_k)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


def _attention_levels(ch_mult, attn_resolutions, resolution):
    """Which levels (0 = full resolution) get attention after each residual block.

    Without ``attn_resolutions`` only the lowest-resolution level does (the reference VQIR's
    hard-coded layout, equal to taming f16 with attn_resolutions [16] at resolution 256). With
    both ``attn_resolutions`` and ``resolution``, taming's rule: level i has attention when
    ``resolution // 2**i`` is in ``attn_resolutions``.
    """
    num_levels = len(ch_mult)
    if attn_resolutions is None and resolution is None:
        return {num_levels - 1}
    if attn_resolutions is None or resolution is None:
        raise ValueError('attn_resolutions and resolution must be given together '
                         f'(got attn_resolutions={attn_resolutions}, resolution={resolution})')
    return {i for i in range(num_levels) if resolution // 2**i in set(attn_resolutions)}


class Encoder(nn.Module):
    """VQGAN encoder. (B, in_channels, H, W) -> (B, z_channels (x2 if double_z), H/2**(L-1), W/2**(L-1)),
    L = len(ch_mult)."""

    def __init__(self,
                 *,
                 ch,
                 ch_mult,
                 num_res_blocks,
                 in_channels,
                 z_channels,
                 double_z=False,
                 dropout=0.0,
                 resamp_with_conv=True,
                 attn_resolutions=None,
                 resolution=None,
                 norm_groups=NORM_GROUPS):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        attn_levels = _attention_levels(ch_mult, attn_resolutions, resolution)

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1, ) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups))
                block_in = block_out
                if i_level in attn_levels:
                    attn.append(AttnBlock(block_in, norm_groups))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)

        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """VQGAN decoder. (B, z_channels, h, w) -> (B, out_channels, h*2**(L-1), w*2**(L-1)), L = len(ch_mult).

    ``forward(z, return_feat=True)`` also returns the feature map of every level after its
    residual/attention blocks and before its upsampling, keyed ``'Level_%d' % 2**i`` (level i is
    at 1/2**i of the output size): for ch 128, ch_mult [1, 1, 2, 2, 4] and an output (B, 3, H, W),
    'Level_1' (B, 128, H, W), 'Level_2' (B, 128, H/2, W/2), 'Level_4' (B, 256, H/4, W/4),
    'Level_8' (B, 256, H/8, W/8), 'Level_16' (B, 512, H/16, W/16).
    """

    def __init__(self,
                 *,
                 ch,
                 out_channels,
                 ch_mult,
                 num_res_blocks,
                 z_channels,
                 dropout=0.0,
                 resamp_with_conv=True,
                 attn_resolutions=None,
                 resolution=None,
                 give_pre_end=False,
                 norm_groups=NORM_GROUPS,
                 norm_out_groups=None):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end = give_pre_end
        attn_levels = _attention_levels(ch_mult, attn_resolutions, resolution)

        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)

        # built from the lowest resolution up, stored in level order (up[0] = full resolution) as taming does
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups))
                block_in = block_out
                if i_level in attn_levels:
                    attn.append(AttnBlock(block_in, norm_groups))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
            self.up.insert(0, up)

        # the output head normalises over the whole image: every group loses its mean there, so fewer
        # groups (norm_out_groups) leave more of the image's colour to conv_out
        self.norm_out = Normalize(block_in, norm_groups if norm_out_groups is None else norm_out_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z, return_feat=False, image=True):
        """Returns the image (or the pre-output features with give_pre_end), plus the level features
        when return_feat is True. ``image=False`` skips the output head (GroupNorm, swish, conv at
        full resolution) and returns None in place of the image, for callers that only use the
        level features."""
        feats = {}
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))

        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if return_feat:
                feats['Level_%d' % 2**i_level] = h
            if i_level != 0:
                h = up.upsample(h)

        if not image:
            h = None
        elif not self.give_pre_end:
            h = self.conv_out(swish(self.norm_out(h)))
        return (h, feats) if return_feat else h


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with a straight-through gradient (taming's VectorQuantizer2).

    Args:
        n_e: number of codebook entries.
        e_dim: code dimension (channels of the input).
        beta: commitment weight.
        remap: optional path of a ``.npy`` array of the code indices in use; indices are then
            reported (and accepted by ``get_codebook_entry``) in that reduced index space.
        sane_index_shape: report indices as (B, h, w) instead of flat (B*h*w,).
        legacy: taming's documented beta placement. taming originally put beta on the codebook
            term instead of the commitment term; released VQGANs were trained that way and
            legacy=True (the default) keeps it (sg = stop-gradient, means over all elements):
            legacy:     loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
            not legacy: loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)
        unknown_index: with remap, what a code outside the used set maps to: 'random', 'extra'
            (one index past the used set) or an integer.
    """

    def __init__(self, n_e, e_dim, beta=0.25, remap=None, sane_index_shape=False, legacy=True,
                 unknown_index='random'):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape

        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

        self.remap = remap
        if remap is not None:
            try:
                used = torch.as_tensor(np.load(remap)).long().flatten()  # no pickles: allow_pickle is off
            except (OSError, ValueError, TypeError) as err:  # missing, unreadable, not a .npy array of numbers
                raise ValueError(f'remap file {remap}: cannot be read as a .npy array of code indices '
                                 f'({getattr(err, "strerror", None) or err})') from None
            if used.numel() == 0 or used.min() < 0 or used.max() >= n_e:
                raise ValueError(f'remap file {remap}: expected code indices in [0, {n_e}), '
                                 f'got {used.numel()} entries')
            self.register_buffer('used', used)
            self.re_embed = used.numel()
            if unknown_index == 'extra':
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != 'random' and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")
            self.unknown_index = unknown_index
        else:
            self.re_embed = n_e

    def forward(self, z):
        """z: (B, e_dim, h, w) -> (z_q (B, e_dim, h, w), loss, (perplexity, None, indices)).

        indices are (B*h*w,) in (b, y, x) order, (B, h, w) with sane_index_shape, and (B*h*w, 1)
        with remap (taming's shapes). The one-hot matrix taming's first quantiser returned is not
        built (None), as in taming's VectorQuantizer2.
        """
        b, c, h, w = z.shape
        if c != self.e_dim:
            raise ValueError(f'VectorQuantizer: input has {c} channels, codebook dimension is {self.e_dim}')
        codebook = self.embedding.weight  # (n_e, C)
        z_flat = z.reshape(b, c, h * w)  # a view; no channels-last copy of z is needed
        # float32 even under autocast: in half precision near codes become indistinguishable
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            codebook32, z32 = codebook.float(), z_flat.float()
            # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 e.z; ||z||^2 is the same for every code of a
            # position, so the argmin only needs ||e||^2 - 2 e.z, one (B, n_e, hw) tensor
            dist = torch.baddbmm(
                codebook32.pow(2).sum(1)[None, :, None], codebook32.expand(b, -1, -1), z32, alpha=-2)
            indices = dist.argmin(dim=1)  # (B, hw)
            del dist
        z_q = self.embedding(indices).transpose(1, 2).reshape(b, c, h, w)

        commitment = F.mse_loss(z, z_q.detach())
        codebook_loss = F.mse_loss(z_q, z.detach())
        if self.legacy:
            loss = commitment + self.beta * codebook_loss
        else:
            loss = self.beta * commitment + codebook_loss

        # straight-through: forward value z_q, gradient of the identity to z
        z_q = z + (z_q - z).detach()

        with torch.no_grad():
            probs = torch.bincount(indices.flatten(), minlength=self.n_e).to(z.dtype) / indices.numel()
            perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))

        indices = indices.flatten()
        if self.remap is not None:
            indices = self.remap_to_used(indices.view(b, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(b, h, w)
        return z_q, loss, (perplexity, None, indices)

    def remap_to_used(self, indices):
        """Full codebook indices (any shape) -> indices into the used set."""
        lookup = torch.full((self.n_e, ), -1, dtype=torch.long, device=indices.device)
        lookup[self.used.to(indices.device)] = torch.arange(self.used.numel(), device=indices.device)
        new = lookup[indices]
        unknown = new < 0
        if unknown.any():
            if self.unknown_index == 'random':
                new[unknown] = torch.randint(0, self.re_embed, (int(unknown.sum()), ), device=new.device)
            else:
                new[unknown] = self.unknown_index
        return new

    def unmap_to_all(self, indices):
        """Indices into the used set (any shape) -> full codebook indices; the 'extra' index maps to 0."""
        indices = indices.clone()
        indices[indices >= self.used.numel()] = 0
        return self.used.to(indices.device)[indices]

    def get_codebook_entry(self, indices, shape):
        """indices: (B*h*w,) or any shape with B*h*w entries; shape: (B, h, w, e_dim) (taming's order),
        or None for the raw (..., e_dim) vectors. Returns (B, e_dim, h, w)."""
        indices = indices.reshape(-1)
        if self.remap is not None:
            indices = self.unmap_to_all(indices)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class BlockColourPath(nn.Module):
    """A linear path for the image's f x f block colours, beside the VQGAN's encoder and decoder.

    ``encode``: the f x f block means of the image, projected (1x1) into the quantiser's input space
    and added to the encoder's output, so that the codes see each block's colour directly.
    ``decode``: the codes projected (1x1) back to ``channels`` colours and upsampled bicubically,
    the base the decoder's image is added to. Through GroupNorms, which remove per-image means and
    scales, a small VQGAN learns colour last (and on few photos not at all); this path gives the codes
    the one thing a 16x LR keeps of a photo. The output projection starts as the input one's
    pseudo-inverse, so that at initialisation colours pass through.

    encode: (B, channels, H, W) -> (B, embed_dim, H/f, W/f);
    decode: (B, embed_dim, h, w) -> (B, channels, h*f, w*f) (or a given size).
    """

    def __init__(self, channels, embed_dim, factor):
        super().__init__()
        self.factor = factor
        self.to_latent = nn.Conv2d(channels, embed_dim, 1)
        self.from_latent = nn.Conv2d(embed_dim, channels, 1)
        self.reset_from_latent()

    @classmethod
    def build(cls, enabled, in_channels, out_channels, embed_dim, factor, owner):
        """The path of a network with the ``colour_path`` option, or None when it is off. Its colours
        are added to the output, so the output needs the input's channels."""
        if not enabled:
            return None
        if in_channels != out_channels:
            raise ValueError(f'{owner}: colour_path needs as many output channels as input channels, got '
                             f'{in_channels} in, {out_channels} out')
        return cls(in_channels, embed_dim, factor)

    @torch.no_grad()
    def reset_from_latent(self):
        """``from_latent`` := the pseudo-inverse of ``to_latent`` (a network-wide init may call it again)."""
        inverse = torch.linalg.pinv(self.to_latent.weight.flatten(1))  # (channels, embed_dim)
        self.from_latent.weight.copy_(inverse.view_as(self.from_latent.weight))
        self.from_latent.bias.copy_(-inverse @ self.to_latent.bias)

    def encode(self, x):
        return self.to_latent(F.avg_pool2d(x, self.factor))

    def decode(self, quant, size=None):
        """``size``: (H, W) of the output when it is not (h*f, w*f) (e.g. a refinement level's)."""
        colours = self.from_latent(quant)
        if size is None:
            size = (quant.shape[-2] * self.factor, quant.shape[-1] * self.factor)
        return F.interpolate(colours, size=tuple(size), mode='bicubic', align_corners=False)


@ARCH_REGISTRY.register()
class VQGAN(nn.Module):
    """VQGAN autoencoder with taming's ``VQModel`` layout and API. Images in [-1, 1].

    Submodules (state_dict order): encoder, decoder, quantize, quant_conv, post_quant_conv (and
    colour_path). For the f16 prior of VQIR: ch 128, ch_mult [1, 1, 2, 2, 4], num_res_blocks 2,
    z_channels 256, n_embed 1024, embed_dim 256 (72,141,699 parameters). See ``Encoder``/``Decoder`` for
    ``attn_resolutions``/``resolution``. ``norm_groups``: groups of every GroupNorm (32, taming's);
    a network with few channels needs fewer, so that no group holds a single channel.
    ``norm_out_groups``: groups of the decoder's last GroupNorm (``decoder.norm_out``, just before
    ``conv_out``) when they differ from ``norm_groups`` (None: the same). That norm takes its
    statistics over the whole image and removes each group's mean, so the colour of the output can
    only come from how channels differ inside a group; one group keeps all of that. The parameters
    are the same for any number of groups, so weights load either way (and behave as trained only
    with the groups they were trained with). ``colour_path``: add a :class:`BlockColourPath` (the
    f x f block means into the quantiser's input, the codes' colours under the decoder's image;
    ``colour_path.*`` parameters after taming's); off by default, taming's layout.
    """

    def __init__(self,
                 *,
                 ch,
                 ch_mult,
                 num_res_blocks,
                 in_channels=3,
                 out_channels=3,
                 z_channels,
                 n_embed,
                 embed_dim,
                 double_z=False,
                 dropout=0.0,
                 attn_resolutions=None,
                 resolution=None,
                 beta=0.25,
                 remap=None,
                 sane_index_shape=False,
                 norm_groups=NORM_GROUPS,
                 norm_out_groups=None,
                 colour_path=False):
        super().__init__()
        ch_mult = tuple(ch_mult)
        warn_if_single_channel_groups(ch, ch_mult, norm_groups, 'VQGAN', norm_out_groups)
        self.encoder = Encoder(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            in_channels=in_channels,
            z_channels=z_channels,
            double_z=double_z,
            dropout=dropout,
            attn_resolutions=attn_resolutions,
            resolution=resolution,
            norm_groups=norm_groups)
        self.decoder = Decoder(
            ch=ch,
            out_channels=out_channels,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            dropout=dropout,
            attn_resolutions=attn_resolutions,
            resolution=resolution,
            norm_groups=norm_groups,
            norm_out_groups=norm_out_groups)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, remap=remap, sane_index_shape=sane_index_shape)
        # taming sizes quant_conv by z_channels; with double_z the encoder emits 2*z_channels
        self.quant_conv = nn.Conv2d(2 * z_channels if double_z else z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.downsample_factor = 2**(len(ch_mult) - 1)
        self.colour_path = BlockColourPath.build(colour_path, in_channels, out_channels, embed_dim,
                                                 self.downsample_factor, 'VQGAN')

    def get_last_layer(self):
        """The decoder's output conv weight (for the adaptive GAN weight of the VQGAN loss)."""
        return self.decoder.conv_out.weight

    def encode(self, x):
        """x (B, in_channels, H, W) -> (quant (B, embed_dim, H/f, W/f), emb_loss, (perplexity, None, indices))."""
        z = self.quant_conv(self.encoder(x))
        if self.colour_path is not None:
            z = z + self.colour_path.encode(x)
        return self.quantize(z)

    def decode(self, quant, return_feat=False):
        """quant (B, embed_dim, h, w) -> image (B, out_channels, h*f, w*f) [, level features]."""
        out = self.decoder(self.post_quant_conv(quant), return_feat=return_feat)
        if self.colour_path is None:
            return out
        if return_feat:
            return out[0] + self.colour_path.decode(quant), out[1]
        return out + self.colour_path.decode(quant)

    def decode_code(self, indices, shape=None, return_feat=False):
        """Decode code indices. shape is taming's (B, h, w, embed_dim); it may be omitted when
        indices are (B, h, w)."""
        if shape is None:
            if indices.dim() != 3:
                raise ValueError(f'decode_code: give shape (B, h, w, embed_dim) or indices of shape (B, h, w), '
                                 f'got indices of shape {tuple(indices.shape)}')
            shape = (*indices.shape, self.quantize.e_dim)
        return self.decode(self.quantize.get_codebook_entry(indices, shape), return_feat=return_feat)

    def forward(self, x, return_feat=False):
        """x (B, in_channels, H, W) -> (reconstruction (B, out_channels, H, W), emb_loss)
        [, level features when return_feat]."""
        quant, emb_loss, _ = self.encode(x)
        if return_feat:
            dec, feats = self.decode(quant, return_feat=True)
            return dec, emb_loss, feats
        return self.decode(quant), emb_loss
