"""Inference with a VQIR network on images of any size: padding, tiling, blending, conversions.

:class:`Rescaler` owns everything between a user's image and the network:

* **Values.** Callers give and get float tensors ``(B, 3, H, W)``, RGB in [0, 1]; the network
  sees [-1, 1], RGB, or BGR with ``network_color='bgr'`` (the reference's stage-1 quirk).
* **Sizes.** The network needs sides that are multiples of ``s = ir_scale``. ``size_mode='pad'``
  (default) extends the bottom/right with a mirror image of the border (reflect padding) and
  crops the reconstructions back, so any image of at least ``s x s`` pixels round-trips to its
  own size, with an LR of ``ceil(H/s) x ceil(W/s)``. ``size_mode='mod_crop'`` instead removes
  the last rows/columns, as the reference's test sets do (for paper-comparable metrics).
* **The LR is an 8-bit image.** ``downscale`` returns values exactly ``k / 255``: what a
  PNG holds, and what ``upscale`` reads back from it bit for bit.
* **Halves.** ``downscale`` runs only the encoder side (VQGAN encoder, codebook, IFRM forward);
  ``upscale`` only the decoder side (IFRM reverse, codebook, VQGAN decoder, MSRM). Both run
  under ``torch.inference_mode()`` with the network in eval mode (its previous mode is restored).
* **Precision.** ``half=True`` (CUDA only) runs the VQGAN and the MSRM under fp16 autocast;
  ``bf16=True`` uses bfloat16 autocast (CPU or CUDA). The codebook search, the IFRM and the
  8-bit quantisation always run in float32: they are cheap (1/16 resolution) and the IFRM
  reverse and the nearest-code search are sensitive to rounding.

Tiling
------
Images too large to run in one piece are split into tiles, both when downscaling and when
upscaling. Automatic when the (padded) image has more than ``auto_tile_pixels`` pixels (the
reference's threshold, 2048 x 1024), forced with ``tile=N``, disabled with ``tile=0``.

* The tile grid lies on LR pixel boundaries: tile cores are multiples of ``s`` HR pixels, at
  most ``tile`` wide, split as evenly as possible (sizes differ by at most one LR pixel).
* Each tile runs on its core plus ``tile_overlap`` HR pixels of context on every side (less
  at the image border). The outer half of that context is discarded. Across the inner band,
  ``tile_overlap`` wide and centred on the boundary between two cores, the two tiles'
  results are cross-faded with a raised-cosine ramp whose weights sum to one.
* Only the full-resolution parts are tiled, and blending happens where it cannot break the
  8-bit grid:

  - ``downscale`` tiles the VQGAN encoder and blends its continuous output (before the codebook
    search). The codebook search, the IFRM forward and the 8-bit rounding then run once on the
    whole 1/16-resolution feature map, so the LR is exactly on the 8-bit grid, and every LR
    pixel is computed once, from the one assembled feature map, with no seam from the IFRM.
  - ``upscale`` runs the IFRM reverse and the codebook lookup once on the whole LR, then tiles
    the VQGAN decoder and the MSRM over the codebook features and blends each output image
    (``Level_k`` at its own resolution).

  The whole-image parts work at 1/16 resolution, where a feature map costs 1/128 of the
  encoder's first full-resolution one, so they are not what limits the image size.
* A tiled result is close to, but not bit-identical with, the whole-image result: the VQGAN's
  receptive field spans well over 100 pixels (more than any practical context), it normalises
  with GroupNorm over what it sees and attends globally at its lowest level, and the MSRM
  attends along whole rows and columns. The reference's tiling has the same property, without
  blending; blending turns the per-tile differences into smooth transitions instead of seams.
"""
import copy
import inspect
import math
import re
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from vqir.archs.lr_quantizer import quantize_lr
from vqir.archs.vqir_arch import VQGAN_DOWNSAMPLE_FACTOR, add_colour_base, refined_images
from vqir.tiling import Tile, TileBlender, tile_spans
from vqir.utils.checkpoint import CheckpointError, load_state_dict, load_weights
from vqir.utils.errors import InputError
from vqir.utils.img_util import check_network_color, from_network, pad_to_multiple, to_network
from vqir.utils.options import OptionsError, did_you_mean

__all__ = [
    'Rescaler', 'NetworkOptionsError', 'official_network_options', 'inspect_vqir_weights', 'vqir_stage_and_scale', 'DEFAULT_AUTO_TILE_PIXELS',
    'INFERENCE_KEYS', 'inference_options', 'check_inference_options', 'check_rescaler_settings'
]

# The Rescaler keyword arguments that the ``inference:`` block of an options file may set.
INFERENCE_KEYS = ('tile', 'tile_overlap', 'size_mode', 'half', 'bf16', 'auto_tile_pixels', 'decoder_image', 'compile')

# The reference runs images with fewer pixels than this in one piece.
DEFAULT_AUTO_TILE_PIXELS = 2048 * 1024
# Automatic tiles (with their context) hold at most 1/AUTO_TILE_FRACTION of the auto_tile_pixels.
AUTO_TILE_FRACTION = 2
# The reference enlarges every tile by 128 HR pixels on each side.
DEFAULT_TILE_OVERLAP = 128

# Network of the released models (reference options test_vqir_stage2.yml); ir_scale and stage are added.
_OFFICIAL_NETWORK = OrderedDict(
    type='VQIR',
    in_channels=3,
    out_channels=3,
    ch=128,
    ch_mult=[1, 1, 2, 2, 4],
    double_z=False,
    num_res_blocks=2,
    z_channels=256,
    n_embed=1024,
    embed_dim=256,
    attn_mult=[3, 3])

_NETWORK_PARTS = ('encoder', 'quant_conv', 'quantize', 'icrm', 'post_quant_conv', 'decoder')


class NetworkOptionsError(InputError, ValueError):
    """Network options (a ``network_g`` block) that do not describe a usable VQIR network."""


def official_network_options(ir_scale, stage=2):
    """Options (``{'type': 'VQIR', ...}``) of the released VQIR networks for ``ir_scale`` 16 or 32."""
    if ir_scale not in (16, 32):
        raise ValueError(f'ir_scale must be 16 or 32, got {ir_scale!r}')
    if stage not in (1, 2):
        raise ValueError(f'stage must be 1 or 2, got {stage!r}')
    opt = copy.deepcopy(_OFFICIAL_NETWORK)
    opt.update(stage=stage, ir_scale=ir_scale)
    if stage == 1:
        del opt['attn_mult']
    return opt


def inspect_vqir_weights(path):
    """(stage, ir_scale) of a VQIR checkpoint, from its entries: ``refine.*`` exists only in stage 2,
    the IFRM's fixed Haar filters (``icrm.*.haar_weights``) only in 32x networks.

    Raises CheckpointError naming the file when it cannot be read or holds no VQIR network.
    """
    keys = list(load_state_dict(path).keys())
    if not any(k.startswith('icrm.') for k in keys):
        if any(k.startswith('encoder.') for k in keys):
            raise CheckpointError(f'{path}: no icrm.* entries: a VQGAN checkpoint, not a VQIR network')
        raise CheckpointError(f'{path}: no icrm.* entries: not a VQIR checkpoint')
    return vqir_stage_and_scale(keys)


def vqir_stage_and_scale(keys):
    """(stage, ir_scale) of the entry names of a VQIR network (``icrm.*`` present)."""
    ir_scale = 32 if any(k.startswith('icrm.') and k.endswith('haar_weights') for k in keys) else 16
    stage = 2 if any(k.startswith('refine.') for k in keys) else 1
    return stage, ir_scale


def _build_network(net_opt, uninitialised=False):
    """Build a VQIR network from ``{'type': 'VQIR', **kwargs}``.

    ``uninitialised``: allocate the parameters without running the random initialisation (the
    network is built on the meta device, then given empty CPU storage), for a network whose
    every parameter is loaded next: initialising 87M parameters costs seconds on a CPU. VQIR
    has no buffers outside its state_dict, so a strict load leaves nothing uninitialised.
    """
    net_opt = copy.deepcopy(dict(net_opt))
    net_type = net_opt.pop('type', None)
    if net_type != 'VQIR':
        raise NetworkOptionsError(f"type must be 'VQIR', got {net_type!r}")
    try:
        if not uninitialised or net_opt.get('remap') is not None:  # a remap file is read while building
            return ARCH_REGISTRY.get(net_type)(**net_opt)
        with torch.device('meta'):
            net = ARCH_REGISTRY.get(net_type)(**net_opt)
        if any(True for _ in net.buffers()):  # buffers might live outside the state_dict: initialise normally
            return ARCH_REGISTRY.get(net_type)(**net_opt)
        return net.to_empty(device='cpu')
    except (TypeError, ValueError, KeyError) as err:  # unknown, missing or invalid keyword: name it
        message = re.sub(r'^(\w+\.)?__init__\(\)', net_type, str(err).strip('"'))
        raise NetworkOptionsError(message) from None


def check_rescaler_settings(ir_scale, tile, tile_overlap, size_mode, network_color, half, bf16, auto_tile_pixels,
                            compile, device_type):  # noqa: A002
    """ValueError naming the first :class:`Rescaler` setting that cannot work on a ``device_type``
    device. ``tile_overlap`` must be whole VQGAN feature pixels: the encoder and decoder work on
    16x16 pixel blocks."""
    if ir_scale not in (16, 32):
        raise ValueError(f'ir_scale must be 16 or 32, got {ir_scale!r}')
    if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 0 or tile % ir_scale):
        below = max(ir_scale, (tile // ir_scale) * ir_scale) if isinstance(tile, int) else ir_scale
        raise ValueError(f'tile={tile!r}: must be 0 (never tile) or a positive multiple of ir_scale {ir_scale} '
                         f'(e.g. {below} or {below + ir_scale})')
    if not isinstance(tile_overlap, int) or isinstance(tile_overlap, bool) or tile_overlap < 0 or \
            tile_overlap % VQGAN_DOWNSAMPLE_FACTOR:
        raise ValueError(f'tile_overlap={tile_overlap!r}: must be a non-negative multiple of '
                         f'{VQGAN_DOWNSAMPLE_FACTOR} (the VQGAN works on 16x16 pixel blocks)')
    if size_mode not in ('pad', 'mod_crop'):
        raise ValueError(f"size_mode must be 'pad' or 'mod_crop', got {size_mode!r}")
    check_network_color(network_color)
    if not isinstance(auto_tile_pixels, int) or auto_tile_pixels <= 0:
        raise ValueError(f'auto_tile_pixels must be a positive integer, got {auto_tile_pixels!r}')
    if half and bf16:
        raise ValueError('choose one of half (fp16) and bf16')
    if half and device_type != 'cuda':
        raise ValueError(f'half precision (fp16) needs a CUDA device; running on {device_type}')
    if not isinstance(compile, (bool, str)):
        raise ValueError(f'compile must be true, false or a torch.compile backend name, got {compile!r}')


def inference_options(opt, opt_path):
    """The ``inference`` block of the options ``opt`` (read from ``opt_path``) as a dict of
    :class:`Rescaler` keyword arguments; OptionsError for a block that is not a mapping of known keys."""
    inference = opt.get('inference')
    if inference is None:
        return {}
    if not isinstance(inference, dict):
        raise OptionsError(f'{opt_path}: option inference must be a mapping')
    for key in inference:
        if key not in INFERENCE_KEYS:
            raise OptionsError(f'{opt_path}: option inference:{key} is not a known inference key'
                               f'{did_you_mean(key, INFERENCE_KEYS)}: known are {", ".join(INFERENCE_KEYS)}')
    return dict(inference)


def check_inference_options(opt, opt_path, ir_scale):
    """:func:`inference_options`, with settings that can run at ``ir_scale`` on this machine
    (``num_gpu: 0`` or no CUDA device: the CPU), checked before a run creates anything."""
    inference = inference_options(opt, opt_path)
    settings = {name: p.default for name, p in inspect.signature(Rescaler).parameters.items()
                if p.default is not p.empty and name not in ('ir_scale', 'device', 'decoder_image')}
    settings.update(inference, network_color=opt.get('network_color', 'rgb'))
    settings.pop('decoder_image', None)  # any value works
    device_type = 'cuda' if opt.get('num_gpu') != 0 and torch.cuda.is_available() else 'cpu'
    try:
        check_rescaler_settings(ir_scale, device_type=device_type, **settings)
    except ValueError as err:
        raise OptionsError(f'{opt_path}: option inference: {err}') from None
    return inference


def _resolve_device(device):
    if device is None or device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device} asked for, but CUDA is not available')
    return device


class Rescaler:
    """Downscale images to 8-bit LR images and rebuild them, with a VQIR network, at any size.

    Args:
        net: a built ``VQIR`` network (a DataParallel/DDP wrapper is unwrapped). Its stage
            (1: ``SR`` output; 2: ``Level_*`` outputs) is read from it.
        ir_scale: 16 or 32; defaults to ``net.ir_scale`` and must equal it when given.
        device: where to run. None keeps the network where it is; 'auto' picks CUDA when
            available; else a device (the network is moved there).
        tile: largest tile core in HR pixels, a multiple of ``ir_scale``. None: tile only images
            with more than ``auto_tile_pixels`` pixels, with a tile size that keeps a tile with
            its context within half that many pixels (768 px cores with the defaults); 0: never tile.
        tile_overlap: context in HR pixels around every tile, a multiple of 16 (see module docstring).
        size_mode: 'pad' (reflect-pad to a multiple of ir_scale, crop back) or 'mod_crop'
            (crop the input to a multiple, as the reference's test sets do).
        network_color: 'rgb', or 'bgr' for networks trained on BGR input (reference stage 1).
        half: fp16 autocast (CUDA only).
        bf16: bfloat16 autocast (CPU or CUDA); not together with ``half``.
        auto_tile_pixels: the automatic tiling threshold, in pixels of the padded image.
        decoder_image: stage 2 only: also return ``SR``, the VQGAN decoder's own image (it costs
            the decoder's output head and one more full-size output); stage 1 always returns it.
        compile: run the full-resolution parts (VQGAN encoder and decoder, MSRM) through
            ``torch.compile`` (True: its default backend, inductor; or a backend's name). The IFRM
            and the codebook search stay eager. The first image of each new size (or tile size)
            compiles, for minutes on a CPU; it pays off over many images of one size.

    The ``inference:`` block of an options file (``tile``, ``tile_overlap``, ``size_mode``, ...)
    maps onto these keyword arguments.

    Methods take and return float tensors ``(B, 3, H, W)``, RGB in [0, 1], on any device; results
    come back float32 on the input's device. Outputs are not clamped (saving clamps).
    """

    def __init__(self,
                 net,
                 *,
                 ir_scale=None,
                 device=None,
                 tile=None,
                 tile_overlap=DEFAULT_TILE_OVERLAP,
                 size_mode='pad',
                 network_color='rgb',
                 half=False,
                 bf16=False,
                 auto_tile_pixels=DEFAULT_AUTO_TILE_PIXELS,
                 decoder_image=False,
                 compile=False):  # noqa: A002  (torch's word for it)
        if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module
        missing = [part for part in _NETWORK_PARTS if not hasattr(net, part)]
        if missing:
            raise TypeError(f'Rescaler needs a VQIR network; {type(net).__name__} has no {", ".join(missing)}')
        self.stage = getattr(net, 'stage', 2 if hasattr(net, 'refine') else 1)
        if self.stage == 2 and not hasattr(net, 'refine'):
            raise TypeError(f'Rescaler: {type(net).__name__} is stage 2 but has no refine module')
        net_scale = getattr(net, 'ir_scale', None)
        if ir_scale is None:
            ir_scale = net_scale
        if device is None:
            param = next(net.parameters(), None)
            self.device = param.device if param is not None else torch.device('cpu')
        else:
            self.device = _resolve_device(device)
        check_rescaler_settings(ir_scale, tile, tile_overlap, size_mode, network_color, half, bf16, auto_tile_pixels,
                                compile, self.device.type)
        if net_scale is not None and net_scale != ir_scale:
            raise ValueError(f'ir_scale {ir_scale} does not match the network, which rescales by {net_scale}')
        self.ir_scale = ir_scale
        self.tile = tile
        self.tile_overlap = tile_overlap
        self.size_mode = size_mode
        self.network_color = network_color
        self.auto_tile_pixels = auto_tile_pixels
        self.decoder_image = self.stage == 1 or bool(decoder_image)
        self.half = half
        self.bf16 = bf16
        self.net = net.to(self.device) if device is not None else net
        self.compile = compile
        # the full-resolution parts, compiled on request (the same modules: weights stay shared)
        parts = [net.encoder, net.decoder, getattr(net, 'refine', None)]
        if compile:
            backend = 'inductor' if compile is True else compile
            parts = [None if part is None else torch.compile(part, backend=backend) for part in parts]
        self._encoder, self._decoder, self._refine = parts
        self._colour_path = getattr(net, 'colour_path', None)  # a prior trained with VQGAN's colour_path
        self._refine_residual = self.stage == 2 and getattr(net, 'refine_residual', False)  # MSRM corrects the decoder

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_weights(cls, weights, scale=None, opt=None, device='auto', half=False, strict=True, **kwargs):
        """Build the network, load ``weights`` and wrap it.

        Args:
            weights: checkpoint file (the reference's plain state_dict ``.pth``, basicsr's
                ``{'params': ...}``, or ``.safetensors``).
            scale: 16 or 32. Without ``opt`` it selects the official network; the weights must
                be of that scale. None: take the scale of the weights.
            opt: network options (the ``network_g`` block of an options file) instead of the
                official configuration; its ``ir_scale`` must match ``scale`` and the weights.
            device, half: see the class. strict: every parameter must be loaded.
            **kwargs: further keyword arguments of :class:`Rescaler` (tile, tile_overlap, ...).

        Raises:
            CheckpointError naming the file: missing or unreadable, not VQIR weights, or weights
            of another scale or stage than asked; NetworkOptionsError for invalid network options.
        """
        stage, weights_scale = inspect_vqir_weights(weights)
        if opt is None:
            if scale is not None and scale != weights_scale:
                raise CheckpointError(f'{weights}: weights of a {weights_scale}x network, but {scale}x was asked for')
            net = _build_network(official_network_options(weights_scale, stage), uninitialised=strict)
        else:
            net = _build_network(opt, uninitialised=strict)
            if scale is not None and net.ir_scale != scale:
                raise NetworkOptionsError(f'ir_scale is {net.ir_scale}, but {scale}x was asked for')
            if net.ir_scale != weights_scale:
                raise CheckpointError(f'{weights}: weights of a {weights_scale}x network, but the network options '
                                      f'have ir_scale {net.ir_scale}')
            if net.stage == 2 and stage == 1:
                raise CheckpointError(f'{weights}: stage-1 weights (no refine.* entries), but the network options '
                                      'are stage 2')
        load_weights(net, weights, strict=strict)
        logger = get_root_logger()
        logger.info(f'Rescaler: stage-{net.stage} VQIR network, {net.ir_scale}x, weights {weights}')
        return cls(net, ir_scale=net.ir_scale, device=device, half=half, **kwargs)

    # ------------------------------------------------------------------------------------ helpers
    @contextmanager
    def _running(self):
        """Eval mode (every module's mode is restored afterwards), inference mode."""
        # each module's own flag: a training model keeps frozen parts in eval mode
        modes = [(module, module.training) for module in self.net.modules()]
        self.net.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            for module, training in modes:
                module.training = training

    def _autocast(self):
        if self.half:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _float32(self):
        """Turn autocast off for the parts that must run in float32."""
        if self.half or self.bf16:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return nullcontext()

    def _to_network(self, img01):
        return to_network(img01.to(self.device, torch.float32), self.network_color)

    def _from_network(self, x):
        return from_network(x.float(), self.network_color)

    def _check_images(self, img, what):
        if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f'{what} must be a (B, 3, H, W) tensor, got {shape}')
        if not img.is_floating_point():
            raise ValueError(f'{what} must be a float tensor in [0, 1], got {img.dtype}')

    def tile_size(self, height, width):
        """Tile core size used for a (padded) HR image of ``height x width``; None when it runs whole."""
        if self.tile == 0:
            return None
        if self.tile is not None:
            return self.tile if max(height, width) > self.tile else None
        if height * width <= self.auto_tile_pixels:
            return None
        # a tile with its context holds at most half the threshold: a 2040x1356 round trip in 6 tiles
        # of about 930x930 peaked at 4.1 GB resident, in 4 tiles of 1270x930 at 4.8 GB, in the same
        # time (both before activations were freed early, which took the 6 tiles to 3.1 GB)
        side = math.isqrt(self.auto_tile_pixels // AUTO_TILE_FRACTION) - 2 * self.tile_overlap
        return max(self.ir_scale, side // self.ir_scale * self.ir_scale)

    def _tiles(self, height, width):
        """Tiles of a padded HR image (sides multiples of ir_scale)."""
        tile = self.tile_size(height, width)
        overlap = self.tile_overlap
        tiles = []
        for core_y in tile_spans(height, tile, self.ir_scale):
            for core_x in tile_spans(width, tile, self.ir_scale):
                ext_y = (max(0, core_y[0] - overlap), min(height, core_y[1] + overlap))
                ext_x = (max(0, core_x[0] - overlap), min(width, core_x[1] + overlap))
                tiles.append(Tile(core_y, core_x, ext_y, ext_x))
        return tiles

    def network_size(self, height, width):
        """(H', W'): the size the network processes for an input of ``height x width`` (padded or cropped)."""
        s = self.ir_scale
        if height < s or width < s:
            raise ValueError(f'image is {width}x{height} pixels; at {s}x rescaling both sides must be at least '
                             f'{s} pixels (one LR pixel)')
        if self.size_mode == 'mod_crop':
            return height // s * s, width // s * s
        return math.ceil(height / s) * s, math.ceil(width / s) * s

    def output_size(self, height, width):
        """(H, W) of the reconstruction of a ``height x width`` input: its own size, or with
        'mod_crop' the size cropped to a multiple of the scale."""
        return self.network_size(height, width) if self.size_mode == 'mod_crop' else (height, width)

    def _fit(self, x):
        """Pad (reflect, bottom/right) or crop ``(B, 3, H, W)`` to multiples of ir_scale."""
        height, width = x.shape[-2:]
        target_h, target_w = self.network_size(height, width)
        if self.size_mode == 'mod_crop':
            return x[..., :target_h, :target_w]
        return pad_to_multiple(x, self.ir_scale)

    # ------------------------------------------------------------------------------------ the two halves
    def _encode(self, x):
        """Network-space HR ``(B, 3, H, W)`` (H, W multiples of ir_scale) -> encoder features
        before the codebook ``(B, embed_dim, H/16, W/16)``, float32, tiled and blended if needed."""
        net = self.net
        tiles = self._tiles(*x.shape[-2:])

        def run(x):
            z = net.quant_conv(self._encoder(x))
            if self._colour_path is not None:  # block means: a tile aligned to the blocks has its own
                z = z + self._colour_path.encode(x)
            return z

        if len(tiles) == 1:
            with self._autocast():
                return run(x).float()
        blender = TileBlender(x.shape[-2:], self.tile_overlap)
        for tile in tiles:
            ys, xs = tile.region(1)
            with self._autocast():
                feat = run(x[:, :, ys, xs])
            blender.add('feat', tile, feat, VQGAN_DOWNSAMPLE_FACTOR)
        return blender.result()['feat']

    def _decode(self, quant_feat):
        """Codebook features ``(B, embed_dim, H/16, W/16)`` -> network-space images
        {'SR': (B, 3, H, W)} (stage 1) or {'Level_k': (B, 3, H/k, W/k), ...} (+ 'SR' with ``decoder_image``; stage 2),
        tiled and blended if needed."""
        net = self.net
        height, width = quant_feat.shape[-2] * VQGAN_DOWNSAMPLE_FACTOR, quant_feat.shape[-1] * VQGAN_DOWNSAMPLE_FACTOR

        def run(feat):
            with self._autocast():
                sr, dec_feat = self._decoder(net.post_quant_conv(feat), return_feat=True,
                                             image=self.decoder_image or self._refine_residual)
                outs = OrderedDict()
                if self.stage == 2:
                    refined = refined_images(self._refine, dec_feat, sr if self._refine_residual else None)
                    outs.update(sorted(refined.items(), key=lambda kv: int(kv[0].split('_')[1])))
                if self.decoder_image:
                    outs['SR'] = sr
                # every image on the codes' block colours, as in VQIR
                outs = OrderedDict(add_colour_base(outs, feat, self._colour_path))
            return outs

        tiles = self._tiles(height, width)
        if len(tiles) == 1:
            return OrderedDict((name, out.float()) for name, out in run(quant_feat).items())
        blender = TileBlender((height, width), self.tile_overlap)
        for tile in tiles:
            ys, xs = tile.region(VQGAN_DOWNSAMPLE_FACTOR)
            for name, out in run(quant_feat[:, :, ys, xs]).items():
                factor = (tile.ext_y[1] - tile.ext_y[0]) // out.shape[-2]
                blender.add(name, tile, out, factor)
        return blender.result()

    # ------------------------------------------------------------------------------------ public API
    def downscale(self, hr):
        """HR ``(B, 3, H, W)`` in [0, 1] -> LR ``(B, 3, ceil(H/s), ceil(W/s))`` (floor with 'mod_crop'),
        float32 with values exactly k/255 (an 8-bit image), on ``hr``'s device."""
        self._check_images(hr, 'HR image')
        net = self.net
        with self._running():
            x = self._fit(self._to_network(hr))
            feat = self._encode(x)
            with self._float32():
                quant_feat, _, _ = net.quantize(feat)
                lr = quantize_lr(net.icrm(quant_feat, rev=False), noise=False)
            lr01 = self._from_network(lr)
            # exactly the value an 8-bit file gives when read and divided by 255 (also after fp16 autocast)
            lr01 = torch.round(lr01 * 255.).clamp_(0., 255.) / 255.
        return lr01.to(hr.device)

    def upscale(self, lr, out_size=None):
        """LR ``(B, 3, h, w)`` in [0, 1] -> OrderedDict of reconstructions in [0, 1] (unclamped).

        Stage 1: {'SR': (B, 3, s*h, s*w)}. Stage 2: {'Level_1': (B, 3, s*h, s*w) (the final image),
        'Level_2': (.., s*h/2, ..), 'Level_4': (.., s*h/4, ..)}, plus 'SR' (the VQGAN decoder's output)
        with ``decoder_image``.

        Args:
            out_size: (H, W) of the original when its sides were not multiples of s: outputs are
                cropped to it (``Level_k`` to ``ceil(H/k) x ceil(W/k)``). Must satisfy
                ``ceil(H/s) == h`` and ``ceil(W/s) == w``.
        """
        self._check_images(lr, 'LR image')
        s = self.ir_scale
        h, w = lr.shape[-2:]
        if out_size is not None:
            out_h, out_w = (int(v) for v in out_size)
            if math.ceil(out_h / s) != h or math.ceil(out_w / s) != w or out_h <= 0 or out_w <= 0:
                raise ValueError(f'output size {out_w}x{out_h} does not fit an LR of {w}x{h} at {s}x: '
                                 f'width must be in {(w - 1) * s + 1}..{w * s}, height in {(h - 1) * s + 1}..{h * s}')
        else:
            out_h, out_w = h * s, w * s
        net = self.net
        with self._running():
            with self._float32():
                re_quant_feat = net.icrm(self._to_network(lr), rev=True)
                quant_feat, _, _ = net.quantize(re_quant_feat.float())
            outs = self._decode(quant_feat)
            results = OrderedDict()
            for name, out in outs.items():
                factor = (h * s) // out.shape[-2]
                out = out[..., :math.ceil(out_h / factor), :math.ceil(out_w / factor)]
                results[name] = self._from_network(out).to(lr.device)
        return results

    def codes(self, lr):
        """LR ``(B, 3, h, w)`` in [0, 1] -> the codebook indices ``(B, h, w)`` its features snap to
        (what :meth:`upscale` decodes): two LRs with the same codes give the same reconstruction."""
        self._check_images(lr, 'LR image')
        net = self.net
        with self._running(), self._float32():
            re_quant_feat = net.icrm(self._to_network(lr), rev=True)
            _, _, (_, _, indices) = net.quantize(re_quant_feat.float())
        return indices.reshape(lr.shape[0], *lr.shape[-2:]).to(lr.device)

    def roundtrip(self, hr):
        """HR ``(B, 3, H, W)`` -> (LR, outputs of :meth:`upscale`) with outputs of the input's size
        (of the cropped size with 'mod_crop')."""
        lr = self.downscale(hr)
        return lr, self.upscale(lr, out_size=self.output_size(*hr.shape[-2:]))
