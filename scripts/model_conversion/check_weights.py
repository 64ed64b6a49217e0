"""Check downloaded weights before a run uses them: format, entries against the released layout, scale.

    python scripts/model_conversion/check_weights.py pretrained/vqir_x16.pth pretrained/vqir_x32.pth \\
        pretrained/vqgan_imagenet_f16_1024.ckpt

For each file: it is read the safe way every run reads it (``torch.load(weights_only=True)`` or
safetensors; nothing in the file runs), recognised as a VQIR network (stage and scale from its
entries) or a VQGAN (a taming ``.ckpt``, or a converted state_dict), and its tensors are compared,
name and shape, with the network the shipped options build: the released VQIR 16x/32x
configuration, or taming's f16 ImageNet VQGAN (1024 codes x 256). Training-only entries of a
taming checkpoint (``loss.*``: LPIPS and discriminator) are counted, not compared.

``--scale 16|32`` and ``--kind vqir|vqgan`` state what the file must be (the file name of the
options files: ``vqir_x16.pth`` is a 16x VQIR network, ``vqgan_*`` a VQGAN). One line per file:
``ok: FILE: ...`` or ``error: FILE: ...``; exit status 1 if any file failed. The sha256 printed for
a good file lets you compare it with the one of the copy you trust.
"""
import argparse
import hashlib
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for folder in (ROOT, HERE):  # the package, and convert_taming_ckpt beside this file
    if folder not in sys.path:
        sys.path.insert(0, folder)

import torch  # noqa: E402

import vqir  # noqa: E402,F401  (registers the architectures)
from vqir.archs.vqgan_arch import VQGAN  # noqa: E402
from vqir.inference import official_network_options, vqir_stage_and_scale  # noqa: E402
from vqir.utils.checkpoint import CheckpointError, load_checkpoint, load_state_dict  # noqa: E402

from convert_taming_ckpt import F16_1024 as TAMING_F16_1024, VQGAN_PREFIXES  # noqa: E402  (taming's f16 layout)

TRAINING_ONLY_PREFIX = 'loss.'


class WeightsError(Exception):
    """What is wrong with one file; the message starts with the file name."""


def sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def expected_shapes(net_opt_or_vqgan):
    """{name: shape} of the network, built on the meta device (no memory, no initialisation)."""
    with torch.device('meta'):
        if isinstance(net_opt_or_vqgan, dict) and net_opt_or_vqgan.get('type') == 'VQIR':
            from basicsr.archs import build_network
            net = build_network(dict(net_opt_or_vqgan))
        else:
            net = VQGAN(**net_opt_or_vqgan)
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith('num_batches_tracked')}


def compare(path, tensors, expected, what):
    """Raise WeightsError listing entries missing, unexpected or of another shape than ``expected``."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or reshaped:
        parts = []
        for title, keys in (('missing', missing), ('unexpected', unexpected), ('of another shape', reshaped)):
            if keys:
                shown = ', '.join(f'{k} {tuple(tensors[k].shape)} (expected {expected[k]})' if title.startswith('of')
                                  else k for k in keys[:3])
                parts.append(f'{len(keys)} {title} ({shown}{", ..." if len(keys) > 3 else ""})')
        raise WeightsError(f'{path}: does not match {what}: {"; ".join(parts)}')


def kind_from_name(path):
    """What the options files expect under this name: ('vqir', 16|32), ('vqgan', None) or (None, None)."""
    name = os.path.basename(path).lower()
    match = re.search(r'vqir_x(16|32)', name)
    if match:
        return 'vqir', int(match.group(1))
    if name.startswith('vqgan'):
        return 'vqgan', None
    return None, None


def check(path, kind=None, scale=None):
    """One line of what ``path`` is; WeightsError when it is not usable as ``kind`` / ``scale``."""
    name_kind, name_scale = kind_from_name(path)
    kind, scale = kind or name_kind, scale or name_scale
    try:
        size = os.path.getsize(path)
        obj = load_checkpoint(path)
        tensors = load_state_dict(path)
    except (CheckpointError, OSError) as err:
        raise WeightsError(str(err) if str(err).startswith(path) else f'{path}: {err}') from None
    file_format = ('safetensors' if path.endswith('.safetensors') else
                   'PyTorch-Lightning checkpoint' if isinstance(obj, dict) and 'state_dict' in obj else
                   'basicsr checkpoint' if isinstance(obj, dict) and ('params' in obj or 'params_ema' in obj) else
                   'plain state_dict')
    is_vqir = any(k.startswith('icrm.') for k in tensors)
    if kind == 'vqir' and not is_vqir:
        raise WeightsError(f'{path}: no icrm.* entries: not a VQIR network (a VQGAN belongs in '
                           'path.pretrain_network_vqgan)')
    if kind == 'vqgan' and is_vqir:
        raise WeightsError(f'{path}: a VQIR network (icrm.* entries), not a VQGAN alone')

    if is_vqir:
        stage, file_scale = vqir_stage_and_scale(tensors)
        if scale is not None and scale != file_scale:
            raise WeightsError(f'{path}: a {file_scale}x network, expected {scale}x')
        compare(path, tensors, expected_shapes(official_network_options(file_scale, stage)),
                f'the released VQIR {file_scale}x layout (stage {stage})')
        what = f'VQIR stage {stage}, {file_scale}x, {len(tensors)} tensors as released'
    else:
        vqgan = {k: v for k, v in tensors.items() if k.startswith(VQGAN_PREFIXES)}
        if not vqgan:
            raise WeightsError(f'{path}: neither a VQIR network (icrm.*) nor a VQGAN (encoder.*, decoder.*, ...)')
        training_only = sum(1 for k in tensors if k.startswith(TRAINING_ONLY_PREFIX))
        others = sorted(k for k in tensors if k not in vqgan and not k.startswith(TRAINING_ONLY_PREFIX))
        if others:
            raise WeightsError(f'{path}: entries of no VQGAN part: {", ".join(others[:3])}'
                               f'{", ..." if len(others) > 3 else ""}')
        compare(path, vqgan, expected_shapes(TAMING_F16_1024), "taming's f16 VQGAN (1024 codes x 256)")
        what = (f"VQGAN f16, 1024 codes x 256, {len(vqgan)} tensors as taming's" +
                (f'; {training_only} training-only entries (loss.*) that runs drop' if training_only else ''))
    return f'{file_format}, {size / 2**20:.1f} MiB: {what}; sha256 {sha256(path)}'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='example:\n'
                                     '  python scripts/model_conversion/check_weights.py pretrained/vqir_x16.pth')
    parser.add_argument('files', nargs='+', metavar='FILE')
    parser.add_argument('--kind', choices=('vqir', 'vqgan'), help='what every file must be (default: from its name)')
    parser.add_argument('--scale', type=int, choices=(16, 32), help='the scale a VQIR file must have')
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            print(f'ok: {path}: {check(path, args.kind, args.scale)}')
        except WeightsError as err:
            print(f'error: {err}', file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
