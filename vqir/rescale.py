"""Rescale images with a VQIR network: ``down`` makes 8-bit LR images, ``up`` rebuilds the images from them.

Usage::

    python -m vqir.rescale down photos/ -o lr/ --weights pretrained/vqir_x16.pth
    python -m vqir.rescale up lr/ -o rebuilt/ --weights pretrained/vqir_x16.pth
    vqir-rescale down big.png -o lr/ --weights pretrained/vqir_x32.pth --scale 32 --tile 512

``down`` writes ``<stem>.png``: the LR image, 1/s of the input size (rounded up), an ordinary
8-bit RGB PNG, and all that ``up`` needs. It also records in PNG text chunks the original size
(``vqir:original_size``, e.g. ``1000x750``), the scale and whether the input was grey, so
``up`` restores the exact size and form; ``--size WxH`` overrides the recorded size (an LR from
elsewhere). ``down --format jpg|webp --quality Q`` writes the LR as a JPEG (4:2:0) or WebP
instead, the record kept in the file's EXIF ImageDescription; ``up`` reads either (a JPEG LR
re-encoded elsewhere, which lost its EXIF, needs ``--size`` when the original's sides did not
divide by the scale). RGBA inputs: the alpha channel is resized with MATLAB-style bicubic
alongside and stored as the LR's alpha (PNG or WebP). 16-bit inputs are read in full; the LR is always 8-bit and ``up``
writes 8 bits unless ``--bit-depth 16``.

The network: ``--weights`` with ``--scale 16|32`` (the released network configuration; the
scale is checked against the weights, and taken from them when not given), or ``--opt FILE``,
an options YAML whose ``network_g`` (or ``network_ir``) block describes the network; its
``path: pretrain_network_g`` is used when ``--weights`` is not given, its ``network_color`` and
``inference`` block (``vqir.inference.INFERENCE_KEYS``: tile, tile_overlap, size_mode, half, bf16,
auto_tile_pixels, decoder_image, compile) are honoured; command-line options take precedence.
Precision and speed: ``--half`` (fp16, CUDA), ``--bf16`` (CPU or CUDA), ``--compile``
(``torch.compile``).

Inputs are turned upright by their EXIF orientation before they are rescaled.

Every input is processed even when some fail; each failure is one line ``error: <file>: <problem>``
on stderr, and the exit status is 1 if any failed. Outputs are written atomically: a failed
image leaves no file behind.
"""
import argparse
import os
import re
import sys
import traceback

import numpy as np
import torch
from basicsr.utils.matlab_functions import imresize
from tqdm import tqdm

from vqir.data.transforms import bicubic_downscale
from vqir.inference import DEFAULT_TILE_OVERLAP, NetworkOptionsError, Rescaler, inference_options
from vqir.utils.allocator import use_huge_pages
from vqir.utils.checkpoint import CheckpointError
from vqir.utils.errors import InputError
from vqir.version import __version__
from vqir.utils.image_io import (DEFAULT_MAX_PIXELS, ImageInfo, ImageReadError, ImageWriteError, list_images, read_image,
                                 write_image)
from vqir.utils.entry_point import project_root
from vqir.utils.img_util import check_network_color
from vqir.utils.options import KNOWN_PATH_KEYS, KNOWN_PATH_KEYS_PREFIXES, KNOWN_TOP_LEVEL_KEYS, OptionsError, \
    load_options_file, resolve_path

TEXT_SIZE = 'vqir:original_size'
TEXT_SCALE = 'vqir:ir_scale'
TEXT_MODE = 'vqir:mode'
NETWORK_BLOCKS = ('network_g', 'network_ir')
UP_EXTENSIONS = ('png', 'jpg', 'webp')  # what `up --ext` writes
LR_FORMATS = ('png', 'jpg', 'webp')  # what `down --format` writes: PNG (lossless, default) or a lossy LR
DEFAULT_LR_QUALITY = 95


class UsageError(InputError, ValueError):
    """A problem with the command line or the options file (reported, exit status 1)."""


def _size_arg(text):
    match = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text)
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT, e.g. 1000x750, got {text!r}')
    return int(match.group(1)), int(match.group(2))


def _device_arg(text):
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', text):
        raise argparse.ArgumentTypeError(f'expected auto, cpu, cuda or cuda:N, got {text!r}')
    return text


EXAMPLES = """examples:
  vqir-rescale down photos/ -o lr/ --weights pretrained/vqir_x16.pth
  vqir-rescale up lr/ -o rebuilt/ --weights pretrained/vqir_x16.pth
  vqir-rescale up lr/ -o rebuilt/ --weights pretrained/vqir_x16.pth --ext jpg --suffix _x16
  vqir-rescale down photos/ -o lr/ --weights pretrained/vqir_x16.pth --format jpg --quality 90
  vqir-rescale down big.png -o lr/ --weights pretrained/vqir_x32.pth --scale 32 --tile 512 --device cuda:1
  vqir-rescale up lr/ -o rebuilt/ --opt options/test/demo_x16.yml     (the demo's network)
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog='vqir-rescale', description='Extreme image rescaling with VQIR: 8-bit LR images and their reconstruction.',
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'%(prog)s (vqir {__version__})')
    sub = parser.add_subparsers(dest='command', required=True, metavar='{down,up}')

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('inputs', nargs='+', metavar='INPUT', help='image files or folders')
    common.add_argument('-o', '--output', required=True, metavar='DIR', help='output folder (created if needed)')
    common.add_argument('--weights', metavar='FILE', help='VQIR weights (.pth, basicsr {"params"} or .safetensors)')
    common.add_argument('--scale', type=int, choices=(16, 32), help='16 or 32 (default: that of the weights)')
    common.add_argument('--opt', metavar='FILE', help='options YAML with a network_g block (instead of the '
                        'released network configuration)')
    common.add_argument('--device', type=_device_arg, default='auto', metavar='{auto,cpu,cuda,cuda:N}',
                        help='where the network runs (default: auto, the first GPU if there is one)')
    common.add_argument('--suffix', default='', metavar='TEXT',
                        help='appended to the name of every output, e.g. _x16: photo.png -> photo_x16.png')
    common.add_argument('--tile', type=int, metavar='N', help='tile size in HR pixels, a multiple of the scale '
                        '(default: automatic above 2048x1024 pixels; 0: never tile)')
    common.add_argument('--tile-overlap', '--tile_overlap', type=int, metavar='N',
                        help=f'context around tiles in HR pixels, a multiple of 16 (default {DEFAULT_TILE_OVERLAP})')
    common.add_argument('--half', action='store_true', help='fp16 autocast (CUDA only)')
    common.add_argument('--bf16', action='store_true',
                        help='bfloat16 autocast (CPU or CUDA; fast on CPUs with AVX-512 BF16 or AMX)')
    common.add_argument('--compile', action='store_true',
                        help='torch.compile the VQGAN and the MSRM (the first image of each size compiles for minutes)')
    common.add_argument('--verbose', action='store_true', help='log what is loaded')

    down = sub.add_parser('down', parents=[common], help='HR images -> 8-bit LR images',
                          description='Downscale images to 8-bit LR images (PNG, or JPEG / WebP to share).',
                          epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    down.add_argument('--mod-crop', action='store_true',
                      help='crop to a multiple of the scale instead of padding (as the reference evaluates)')
    down.add_argument('--format', choices=LR_FORMATS, default='png',
                      help='format of the LR (default png, lossless; jpg (4:2:0) and webp are lossy)')
    down.add_argument('--quality', type=int, metavar='Q',
                      help='JPEG / WebP quality 1-100 of the LR (default 95; only with --format jpg or webp)')
    up = sub.add_parser('up', parents=[common], help='LR images -> reconstructed images',
                        description='Rebuild images from LR images made by "down" (PNG, JPEG or WebP).', epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument('--size', type=_size_arg, metavar='WxH',
                    help='output size (default: recorded by "down", else scale x LR size)')
    up.add_argument('--bit-depth', type=int, choices=(8, 16), default=8, help='bits per sample of the outputs')
    up.add_argument('--ext', choices=UP_EXTENSIONS, default='png',
                    help='format of the outputs (default png; jpg and webp are 8-bit, jpg has no alpha)')
    return parser


# ---------------------------------------------------------------------------------------------- network


def _read_network_options(opt_path):
    """(network block name, network options, weights from path:, network_color, inference options)."""
    opt = load_options_file(opt_path)
    for key in opt:
        if key not in KNOWN_TOP_LEVEL_KEYS and not key.startswith('network_'):
            raise OptionsError(f'{opt_path}: unknown option key "{key}"')
    blocks = [b for b in NETWORK_BLOCKS if b in opt]
    if not blocks:
        raise OptionsError(f'{opt_path}: no network_g (or network_ir) block describing the VQIR network')
    block = blocks[0]
    net_opt = opt[block]
    if not isinstance(net_opt, dict) or net_opt.get('type') != 'VQIR':
        got = net_opt.get('type') if isinstance(net_opt, dict) else net_opt
        raise OptionsError(f'{opt_path}: {block}: type must be VQIR, got {got!r}')

    path_opt = opt.get('path') or {}
    if not isinstance(path_opt, dict):
        raise OptionsError(f'{opt_path}: path must be a mapping')
    for key in path_opt:
        if key not in KNOWN_PATH_KEYS and not key.startswith(KNOWN_PATH_KEYS_PREFIXES):
            raise OptionsError(f'{opt_path}: path:{key} is not a known path key')
    weights = path_opt.get('pretrain_' + block)
    weights = resolve_path(weights, project_root()) if isinstance(weights, str) and weights else None

    network_color = opt.get('network_color', 'rgb')
    try:
        check_network_color(network_color)
    except ValueError as err:
        raise OptionsError(f'{opt_path}: option {err}') from None
    return block, net_opt, weights, network_color, inference_options(opt, opt_path)


def build_rescaler(args):
    """The Rescaler the command line asks for; UsageError / CheckpointError name the culprit."""
    net_opt, weights, kwargs = None, args.weights, {}
    if args.opt:
        block, net_opt, opt_weights, network_color, kwargs = _read_network_options(args.opt)
        kwargs['network_color'] = network_color
        weights = weights or opt_weights
    if not weights:
        raise UsageError('--weights is required (or --opt with path: pretrain_network_g)')
    if args.tile is not None:
        kwargs['tile'] = args.tile
    if args.tile_overlap is not None:
        kwargs['tile_overlap'] = args.tile_overlap
    if args.command == 'down' and args.mod_crop:
        kwargs['size_mode'] = 'mod_crop'
    if args.bf16:
        kwargs['bf16'] = True
    if args.compile:
        kwargs['compile'] = True
    half = args.half or bool(kwargs.pop('half', False))
    if half and kwargs.get('bf16'):
        raise UsageError('choose one of --half (fp16) and --bf16 (or inference:half / inference:bf16)')
    if half and (args.device == 'cpu' or not torch.cuda.is_available()):
        where = '--half' if args.half else f'{args.opt}: inference:half'
        raise UsageError(f'{where} needs a CUDA device')
    if args.device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise UsageError(f'--device {args.device}: CUDA is not available')
        index = int(args.device.partition(':')[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f'--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    try:
        return Rescaler.from_weights(weights, scale=args.scale, opt=net_opt, device=args.device, half=half, **kwargs)
    except NetworkOptionsError as err:
        raise UsageError(f'{args.opt}: {block}: {err}') from None
    except CheckpointError:
        raise
    except ValueError as err:  # tile, tile_overlap, ... from the command line or the inference block
        raise UsageError(str(err)) from None


# ---------------------------------------------------------------------------------------------- one image


def _to_tensor(img):
    """(H, W, 3) float32 -> (1, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def _alpha_down(alpha, rescaler):
    """Alpha (H, W) in [0, 1] -> (h, w) of the LR: padded/cropped like the image, MATLAB bicubic 1/s."""
    s = rescaler.ir_scale
    height, width = alpha.shape
    target_h, target_w = rescaler.network_size(height, width)
    if rescaler.size_mode == 'mod_crop':
        alpha = alpha[:target_h, :target_w]
    else:
        alpha = np.pad(alpha, ((0, target_h - height), (0, target_w - width)), mode='reflect')
    return np.clip(bicubic_downscale(alpha, s), 0., 1.)


def _alpha_up(alpha, scale, out_h, out_w):
    """LR alpha (h, w) -> (out_h, out_w): MATLAB bicubic x s, cropped."""
    return np.clip(imresize(alpha, scale)[:out_h, :out_w], 0., 1.)


def downscale_file(rescaler, path, out_path, quality=None):
    img, info = read_image(path)
    height, width = img.shape[:2]
    try:
        lr = rescaler.downscale(_to_tensor(img))
    except ValueError as err:
        raise ValueError(f'{path}: {err}') from None
    alpha = _alpha_down(info.alpha, rescaler) if info.alpha is not None else None
    height, width = rescaler.output_size(height, width)
    if alpha is not None and out_path.lower().endswith('.jpg'):
        raise ValueError(f'{path}: has an alpha channel, which a JPEG LR cannot keep (use --format png or webp)')
    text = {TEXT_SIZE: f'{width}x{height}', TEXT_SCALE: str(rescaler.ir_scale), TEXT_MODE: info.mode}
    write_image(out_path, lr[0], alpha=alpha, text=text, quality=quality)


def upscale_file(rescaler, path, out_path, size=None, bit_depth=8):
    lr, info = read_image(path)
    s = rescaler.ir_scale
    recorded_scale = info.text.get(TEXT_SCALE)
    if recorded_scale is not None and recorded_scale != str(s):
        raise ValueError(f'{path}: this LR was made at {recorded_scale}x, the network rescales by {s}x')
    if size is None and TEXT_SIZE in info.text:
        try:
            size = _size_arg(info.text[TEXT_SIZE])
        except argparse.ArgumentTypeError:
            raise ValueError(f'{path}: unreadable {TEXT_SIZE} text chunk {info.text[TEXT_SIZE]!r} '
                             '(give --size)') from None
    h, w = lr.shape[:2]
    out_w, out_h = size if size is not None else (w * s, h * s)
    if out_h * out_w > DEFAULT_MAX_PIXELS:  # a small LR must not expand into an unbounded allocation
        raise ValueError(f'{path}: the output would be {out_w}x{out_h} = {out_h * out_w:,} pixels, more than the '
                         f'limit of {DEFAULT_MAX_PIXELS:,}')
    try:
        outputs = rescaler.upscale(_to_tensor(lr), out_size=(out_h, out_w))
    except ValueError as err:
        raise ValueError(f'{path}: {err}') from None
    image = outputs['Level_1'] if 'Level_1' in outputs else outputs['SR']
    alpha = _alpha_up(info.alpha, s, out_h, out_w) if info.alpha is not None else None
    mode = info.text.get(TEXT_MODE, info.mode)
    out_info = ImageInfo(path=path, mode='gray' if mode == 'gray' else 'rgb', bit_depth=bit_depth,
                         size=(out_h, out_w))
    write_image(out_path, image[0], info=out_info, bit_depth=bit_depth, alpha=alpha)


# ---------------------------------------------------------------------------------------------- main


def _is_allocation_failure(err):
    """The CPU allocator's out-of-memory (a RuntimeError, unlike torch.OutOfMemoryError)."""
    return "can't allocate memory" in str(err) or 'not enough memory' in str(err)


def _report(message):
    tqdm.write(f'error: {message}', file=sys.stderr)


def main(argv=None):
    """Command-line entry point; returns the exit status (0: all written, 1: something failed)."""
    use_huge_pages()  # before the first tensor: PyTorch reads the setting at its first allocation
    args = build_parser().parse_args(argv)
    if args.verbose:
        from basicsr.utils import get_root_logger
        get_root_logger(log_level='INFO').setLevel('INFO')

    failed = 0
    files = []
    for item in args.inputs:
        try:
            files += list_images(item)
        except ImageReadError as err:
            _report(err)
            failed += 1
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        _report(f'{args.output}: exists and is not a folder')
        return 1
    if not files:
        return 1

    ext = getattr(args, 'ext', None) or getattr(args, 'format', 'png')
    quality = getattr(args, 'quality', None)
    try:
        if ext != 'png' and getattr(args, 'bit_depth', 8) == 16:
            raise UsageError(f'--ext {ext} stores 8 bits per sample; --bit-depth 16 needs --ext png')
        if quality is not None and (ext == 'png' or not 1 <= quality <= 100):
            raise UsageError(f'--quality {quality}: needs --format jpg or webp and a value from 1 to 100')
        if args.command == 'down' and ext != 'png' and quality is None:
            quality = DEFAULT_LR_QUALITY
        rescaler = build_rescaler(args)
    except (UsageError, OptionsError, CheckpointError) as err:
        _report(err)
        return 1
    os.makedirs(args.output, exist_ok=True)

    written = {}  # output path -> input that produced it
    for path in tqdm(files, unit='image', disable=None, desc=args.command):
        out_path = os.path.join(args.output, f'{os.path.splitext(os.path.basename(path))[0]}{args.suffix}.{ext}')
        if os.path.exists(out_path) and os.path.samefile(out_path, path):
            _report(f'{path}: the output {out_path} would overwrite the input (choose another -o)')
            failed += 1
            continue
        if out_path in written:
            _report(f'{path}: the output {out_path} was already written for {written[out_path]} (same name)')
            failed += 1
            continue
        try:
            if args.command == 'down':
                downscale_file(rescaler, path, out_path, quality)
            else:
                upscale_file(rescaler, path, out_path, size=args.size, bit_depth=args.bit_depth)
            written[out_path] = path
        except (ImageReadError, ImageWriteError, ValueError) as err:
            _report(err)
            failed += 1
        except torch.OutOfMemoryError:
            _report(f'{path}: out of memory (try a smaller --tile)')
            failed += 1
        except OSError as err:
            _report(f'{path}: {err.strerror or err}')
            failed += 1
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not _is_allocation_failure(err):  # a fault, not the machine's size: keep its traceback
                tqdm.write(traceback.format_exc().rstrip(), file=sys.stderr)
            _report(f'{path}: {first_line}')  # and go on with the other images
            failed += 1
    if failed:
        print(f'{len(written)} written to {args.output}, {failed} failed', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
