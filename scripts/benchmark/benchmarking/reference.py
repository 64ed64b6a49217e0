"""The reference implementation (github.com/huai-chang/VQIR) beside ours: its checkout, its import
(with stand-ins for timm and einops where they are missing), its network with our weights, and its
tiled test loop."""
import importlib
import math
import re
import sys
import types
from os import path as osp

import torch

from benchmarking import ROOT
from benchmarking.networks import network_options


def _install_timm_stub():
    """Provide ``timm.models.layers.trunc_normal_`` (weights initialisation only) when timm is absent."""
    timm = types.ModuleType('timm')
    models = types.ModuleType('timm.models')
    layers = types.ModuleType('timm.models.layers')
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    timm.models, models.layers = models, layers
    sys.modules.update({'timm': timm, 'timm.models': models, 'timm.models.layers': layers})


def minimal_rearrange(tensor, pattern, **sizes):
    """einops-style ``rearrange`` for patterns made of axis names and parenthesised groups,
    e.g. 'b c h w -> b h w c', '(b h w) -> b h w', 'b (h w) c -> b c h w' (sizes of decomposed
    groups from keyword arguments). A permute between two reshapes, as einops does."""
    def groups(side):
        return [g.split() if g else [name] for g, name in re.findall(r'\(([^)]*)\)|(\w+)', side)]

    left, right = (groups(side) for side in pattern.split('->'))
    if len(left) != tensor.dim():
        raise ValueError(f'rearrange: pattern {pattern!r} has {len(left)} axes, tensor has {tensor.dim()}')
    axis_size = dict(sizes)
    for dim, group in zip(tensor.shape, left):
        unknown = [a for a in group if a not in sizes]
        known = math.prod(sizes[a] for a in group if a in sizes)
        if len(unknown) > 1:
            raise ValueError(f'rearrange: cannot infer sizes of {unknown} in {pattern!r}')
        if unknown:
            axis_size[unknown[0]] = dim // known
    axes = [a for g in left for a in g]
    order = [a for g in right for a in g]
    x = tensor.reshape([axis_size[a] for a in axes]).permute([axes.index(a) for a in order])
    return x.reshape([math.prod(axis_size[a] for a in g) for g in right])


def _install_einops_stub():
    einops = types.ModuleType('einops')
    einops.rearrange = minimal_rearrange
    sys.modules['einops'] = einops


def check_reference_dir(ref_dir):
    ref_dir = osp.abspath(ref_dir)
    arch = osp.join(ref_dir, 'vqir', 'archs', 'vqir_arch.py')
    if not osp.isfile(arch):
        raise SystemExit(f'--reference {ref_dir}: no vqir/archs/vqir_arch.py there (expected a checkout of '
                         'github.com/huai-chang/VQIR)')
    if osp.commonpath([ref_dir, ROOT]) == ROOT:
        raise SystemExit(f'--reference {ref_dir}: lies inside this repository ({ROOT}); keep the reference '
                         'checkout outside it, e.g. /tmp/vqir_ref')
    return ref_dir


def import_reference(ref_dir):
    """The reference's VQIR class, and the list of substitutions made to import it (see benchmark.py's docstring)."""
    substitutions = []
    try:
        importlib.import_module('timm.models.layers')
    except ImportError:
        _install_timm_stub()
        substitutions.append('timm.models.layers.trunc_normal_ = torch.nn.init.trunc_normal_ (timm not installed)')
    try:
        importlib.import_module('einops')
    except ImportError:
        _install_einops_stub()
        substitutions.append('einops.rearrange = minimal permute/reshape (einops not installed)')
    pkg = osp.join(ref_dir, 'vqir')
    if pkg not in sys.path:
        sys.path.insert(0, pkg)
    module = importlib.import_module('archs.vqir_arch')
    return module.VQIR, substitutions


def _device_safe_quan_forward(x, train=True):
    """The reference's ``Quan.forward`` with its training noise drawn on x's device instead of ``.cuda()``."""
    x = (x + 1.) / 2. * 255.0
    if train:
        out = torch.clamp(x + torch.nn.init.uniform_(torch.zeros_like(x), -0.5, 0.5), 0, 255.)
    else:
        out = torch.clamp(x.round() * 1.0, 0, 255.)
    return (out / 255.0 - 0.5) / 0.5


def build_reference(spec, stage, ours, device):
    """The reference VQIR with our weights (strict load; the names are equal)."""
    ref_cls, substitutions = import_reference(spec['reference'])
    opt = network_options(spec, stage)
    opt.pop('type')
    ref = ref_cls(**opt)
    ref.load_state_dict(ours.state_dict(), strict=True)
    if device.type != 'cuda' and hasattr(ref, 'quan'):
        ref.quan.forward = _device_safe_quan_forward
        substitutions.append('Quan.forward: training noise on the input device instead of .cuda() (no CUDA)')
    return ref.eval().to(device), substitutions


# The reference's test loop (VQIRRFModel.nondist_validation): images of at least 2048 x 1024 pixels
# go through test_tile([2, 1], 128), two tiles side by side, each with 128 px of context.
REFERENCE_TILE_PIXELS = 2048 * 1024
REFERENCE_TILE_GRID = (2, 1)
REFERENCE_TILE_PAD = 128


def _split_evenly(length, parts):
    """(lengths, offsets) of ``parts`` nearly equal pieces, the longer ones last (the reference's split_image)."""
    quotient, remainder = divmod(length, parts)
    lengths = [quotient] * (parts - remainder) + [quotient + 1] * remainder
    return lengths, [sum(lengths[:i]) for i in range(parts)]


def reference_test_tiles(height, width, scale):
    """Tiles of the reference's test loop: [(core (y0, y1, x0, x1), padded (y0, y1, x0, x1))], in HR pixels."""
    if height * width < REFERENCE_TILE_PIXELS:
        return [((0, height, 0, width), (0, height, 0, width))]
    (len_x, ofs_x), (len_y, ofs_y) = (_split_evenly(width // scale, REFERENCE_TILE_GRID[0]),
                                      _split_evenly(height // scale, REFERENCE_TILE_GRID[1]))
    tiles = []
    for oy, ly in zip(ofs_y, len_y):
        for ox, lx in zip(ofs_x, len_x):
            y0, y1, x0, x1 = oy * scale, (oy + ly) * scale, ox * scale, (ox + lx) * scale
            pad = REFERENCE_TILE_PAD
            tiles.append(((y0, y1, x0, x1), (max(y0 - pad, 0), min(y1 + pad, height), max(x0 - pad, 0),
                                             min(x1 + pad, width))))
    return tiles


def reference_tiled_forward(net, x, tiles, scale):
    """The reference's tiled test: forward each padded tile, paste its core into full-size outputs."""
    outputs = {}
    for (y0, y1, x0, x1), (py0, py1, px0, px1) in tiles:
        out = net(x[:, :, py0:py1, px0:px1], is_train=False)
        for name, value in out.items():
            factor = scale if name == 'LR' else int(name.split('_')[1])
            if name not in outputs:
                outputs[name] = x.new_zeros((x.shape[0], value.shape[1], x.shape[2] // factor, x.shape[3] // factor))
            outputs[name][:, :, y0 // factor:y1 // factor, x0 // factor:x1 // factor] = \
                value[:, :, (y0 - py0) // factor:(y1 - py0) // factor, (x0 - px0) // factor:(x1 - px0) // factor]
        del out
    return outputs
