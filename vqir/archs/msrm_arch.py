"""Multi-scale refinement module (MSRM) of VQIR, stage 2.

Refines the VQGAN decoder's features coarse to fine into images at 1/4, 1/2 and full size.
For ch 128, ch_mult [1, 1, 2, 2, 4], attn_mult [3, 3] (the released models):

    Level_4 (B, 256, H/4, W/4) -> 3 x (Intra, Inter) axial blocks, 4 heads -> img_out -> (B, 3, H/4, W/4)
                                                                         \\-> attn_out -> gate (B, 128, H/2, W/2)
    Level_2 (B, 128, H/2, W/2) * gate -> 3 x (Intra, Inter), 2 heads -> img_out -> (B, 3, H/2, W/2)
                                                                   \\-> attn_out -> gate (B, 128, H, W)
    Level_1 (B, 128, H, W) * gate -> ResnetBlock -> ResnetBlock -> conv3x3 -> (B, 3, H, W)

In general there is one branch per entry of ``attn_mult``, at Level_2**len(attn_mult) down to
Level_2; branch i has ``attn_mult[i]`` (Intra, Inter) pairs and works on the decoder's
``ch * ch_mult[len(attn_mult) - i]`` channels. A gate is a sigmoid map: 1x1 conv to the next
finer level's channels, nearest 2x upsampling with a 3x3 conv, sigmoid.

Parameter names, shapes and order equal the reference's ``Refine`` module, i.e. the ``refine.*``
entries of the released checkpoints without that prefix (``refine.<i>.rfb...``, ``refine_out...``).
"""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from vqir.archs.axial_attention import InterAxialBlock, IntraAxialBlock
from vqir.archs.vqgan_arch import NORM_GROUPS, ResnetBlock, Upsample

__all__ = ['RefinementBranch', 'MSRM']

# The reference fixes the head count of a branch at channels // 64, which its checkpoints rely on.
CHANNELS_PER_HEAD = 64
# The reference's output ResnetBlocks are built with a 512-d time-embedding projection that is
# never used; it is kept so the checkpoints load strictly.
UNUSED_TEMB_CHANNELS = 512


class RefinementBranch(nn.Module):
    """Axial-attention refinement of one decoder level.

    Args:
        channels: C, the level's feature channels (at least 64; heads = C // 64).
        num_attn_pairs: number of (IntraAxialBlock, InterAxialBlock) pairs.
        map_channels: channels of the next finer level, which the gate multiplies.

    forward(feat): feat (B, C, h, w) -> (image (B, 3, h, w), gate (B, map_channels, 2h, 2w) in (0, 1)).
    """

    def __init__(self, channels, num_attn_pairs, map_channels):
        super().__init__()
        if channels < CHANNELS_PER_HEAD:
            raise ValueError(f'RefinementBranch: {channels} channels give channels // {CHANNELS_PER_HEAD} = 0 '
                             f'attention heads; at least {CHANNELS_PER_HEAD} channels are needed')
        num_heads = channels // CHANNELS_PER_HEAD
        blocks = []
        for _ in range(num_attn_pairs):
            blocks += [IntraAxialBlock(channels, num_heads), InterAxialBlock(channels, num_heads)]
        self.rfb = nn.Sequential(*blocks)
        self.img_out = nn.Conv2d(channels, 3, kernel_size=3, padding=1)
        self.attn_out = nn.Sequential(
            nn.Conv2d(channels, map_channels, kernel_size=1),
            Upsample(map_channels, with_conv=True),
            nn.Sigmoid(),
        )

    def forward(self, feat):
        feat = self.rfb(feat)
        return self.img_out(feat), self.attn_out(feat)


def _init_weights(module):
    """The reference VQIR's initialisation: truncated normal (std 0.02) weights and zero biases for
    linear and conv layers, identity affine for normalisation layers."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@ARCH_REGISTRY.register()
class MSRM(nn.Module):
    """Multi-scale refinement module.

    Args:
        ch: base channel count of the VQGAN decoder (128 for taming's f16).
        ch_mult: the decoder's channel multipliers per level, finest first ([1, 1, 2, 2, 4]).
        attn_mult: (Intra, Inter) pair counts of the branches, coarsest first ([3, 3]: Level_4, Level_2).
        norm_groups: groups of the GroupNorms of the output blocks (32, as the VQGAN's).

    forward(feats): feats holds the decoder features 'Level_1' (B, ch*ch_mult[0], H, W),
    'Level_2' (B, ch*ch_mult[1], H/2, W/2), ..., 'Level_<2**n>' (n = len(attn_mult)); returns
    {'Level_<2**n>': (B, 3, H/2**n, W/2**n), ..., 'Level_2': (B, 3, H/2, W/2), 'Level_1': (B, 3, H, W)},
    coarsest first; 'Level_1' is the reconstruction. Images are in the decoder's range ([-1, 1]), not clamped.
    """

    def __init__(self, ch, ch_mult, attn_mult, norm_groups=NORM_GROUPS):
        super().__init__()
        attn_mult = list(attn_mult)
        ch_mult = list(ch_mult)
        if len(ch_mult) < len(attn_mult) + 1:
            raise ValueError(f'MSRM: attn_mult {attn_mult} asks for {len(attn_mult) + 1} levels, '
                             f'ch_mult {ch_mult} has only {len(ch_mult)}')
        if any(n < 0 for n in attn_mult):
            raise ValueError(f'MSRM: attn_mult entries must be >= 0, got {attn_mult}')
        num_branches = len(attn_mult)
        level_channels = [ch * m for m in ch_mult[:num_branches + 1]]  # finest first

        # branch i works at Level_2**(n - i), coarsest first
        self.levels = ['Level_%d' % 2**(num_branches - i) for i in range(num_branches)]
        self.level_channels = {'Level_%d' % 2**i: c for i, c in enumerate(level_channels)}
        self.refine = nn.ModuleList()
        for i, level in enumerate(self.levels):
            channels = level_channels[num_branches - i]
            if channels < CHANNELS_PER_HEAD:
                raise ValueError(f'MSRM: the {level} branch has {channels} channels (ch {ch} x ch_mult '
                                 f'{ch_mult[num_branches - i]}); its attention uses channels // '
                                 f'{CHANNELS_PER_HEAD} heads, so it needs at least {CHANNELS_PER_HEAD}')
            finer_channels = level_channels[num_branches - i - 1]
            self.refine.append(RefinementBranch(channels, num_attn_pairs=attn_mult[i], map_channels=finer_channels))

        out_channels = level_channels[0]
        self.refine_out = nn.Sequential(
            ResnetBlock(out_channels, out_channels, dropout=0.0, temb_channels=UNUSED_TEMB_CHANNELS,
                        norm_groups=norm_groups),
            ResnetBlock(out_channels, out_channels, dropout=0.0, temb_channels=UNUSED_TEMB_CHANNELS,
                        norm_groups=norm_groups),
            nn.Conv2d(out_channels, 3, kernel_size=3, padding=1),
        )
        self.apply(_init_weights)
        # Never used in forward: frozen, so optimisers skip it and DDP needs no unused-parameter search.
        for block in self.refine_out[:2]:
            block.temb_proj.requires_grad_(False)

    @torch.no_grad()
    def zero_image_outputs(self):
        """Zero the convolutions that write the images (every level's), so that the module outputs zeros:
        as a correction added to another image, it starts as no correction."""
        for conv in [branch.img_out for branch in self.refine] + [self.refine_out[-1]]:
            conv.weight.zero_()
            conv.bias.zero_()

    def _feature(self, feats, level, like=None):
        """feats[level], checked against the expected channels and, if given, the gate's shape."""
        if level not in feats:
            raise KeyError(f'MSRM: decoder feature {level!r} missing, got keys {sorted(feats)}')
        feat = feats[level]
        channels = self.level_channels[level]
        if feat.dim() != 4 or feat.shape[1] != channels:
            raise ValueError(f'MSRM: {level} must be (B, {channels}, h, w), got {tuple(feat.shape)}')
        if like is not None and like.shape != feat.shape:
            raise ValueError(f'MSRM: {level} {tuple(feat.shape)} does not match the gate from the coarser '
                             f'level {tuple(like.shape)} (each level must be twice the size of the next coarser)')
        return feat

    def forward(self, feats):
        results = {}
        gate = None
        for level, branch in zip(self.levels, self.refine):
            feat = self._feature(feats, level, like=gate)
            if gate is not None:
                # the product takes the gate's channels-last format, in which the blocks run copy-free
                feat, gate = gate * feat, None  # drop the gate now: it is as large as the level
            image, gate = branch(feat)
            results[level] = image.contiguous()
        feat = self._feature(feats, 'Level_1', like=gate)
        if gate is not None:
            feat, gate = feat * gate, None
        # NCHW on purpose: CPU GroupNorm (in the ResnetBlocks) loses precision on channels-last input
        feat = feat.contiguous()
        # layer by layer, so that each full-resolution map is freed as soon as the next layer has used it
        for layer in self.refine_out:
            feat = layer(feat)
        results['Level_1'] = feat.contiguous()
        return results
