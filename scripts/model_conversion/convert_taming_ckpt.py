"""Convert a taming-transformers VQGAN checkpoint (.ckpt) into a clean VQGAN state_dict.

    python scripts/model_conversion/convert_taming_ckpt.py vqgan_imagenet_f16_1024/ckpts/last.ckpt \\
        pretrained/vqgan_f16_1024.pth [--keep-discriminator] [--config vqgan.yaml | --ch 128 ...]

The checkpoint is read safely (weights only, no code from the file runs). The VQGAN tensors
(encoder.*, decoder.*, quantize.*, quant_conv.*, post_quant_conv.*, and colour_path.* of a VQGAN
trained with one) are written to OUT (.pth: torch.save of a plain state_dict; .safetensors:
safetensors), after checking that they load strictly into a VQGAN of the given configuration
(default: taming's f16 ImageNet model, codebook 1024 x 256). Training-only entries (loss.*: LPIPS
and discriminator weights) are dropped; with --keep-discriminator the ``loss.discriminator.*``
tensors are kept under their taming names, and checked against a PatchGANDiscriminator of the size
the tensors imply.

--config takes taming's model YAML (model.params.ddconfig / n_embed / embed_dim), a stage-0
options file (its network_g) or a flat mapping of VQGAN arguments. It also turns a VQGAN trained
here (experiments/<name>/models/net_g_*.pth) into a weights-only file, e.g. the demo's prior:

    python scripts/model_conversion/convert_taming_ckpt.py experiments/demo_stage0_vqgan/models/net_g_latest.pth \\
        pretrained/demo_vqgan_f16.safetensors --config options/train/demo_stage0_vqgan.yml
"""
import argparse
import os
import sys
from collections import Counter, OrderedDict

F16_1024 = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256, n_embed=1024, embed_dim=256)
# colour_path.*: the block-colour path of a VQGAN trained here with colour_path (taming's have none)
VQGAN_PREFIXES = ('encoder.', 'decoder.', 'quantize.', 'quant_conv.', 'post_quant_conv.', 'colour_path.')
DISCRIMINATOR_PREFIX = 'loss.discriminator.'
# taming ddconfig name -> VQGAN argument name (None: not a VQGAN argument)
TAMING_DDCONFIG = {
    'ch': 'ch',
    'ch_mult': 'ch_mult',
    'num_res_blocks': 'num_res_blocks',
    'in_channels': 'in_channels',
    'out_ch': 'out_channels',
    'z_channels': 'z_channels',
    'double_z': 'double_z',
    'dropout': 'dropout',
    'attn_resolutions': 'attn_resolutions',
    'resolution': 'resolution',
}


class ConversionError(Exception):
    pass


def config_from_yaml(path):
    import yaml
    try:
        with open(path, encoding='utf-8') as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ConversionError(f'{path}: cannot read config ({str(err).splitlines()[0]})') from None
    if not isinstance(cfg, dict):
        raise ConversionError(f'{path}: expected a mapping at the top level')
    params = cfg.get('model', {}).get('params') if isinstance(cfg.get('model'), dict) else None
    if isinstance(params, dict) and 'ddconfig' in params:  # taming's layout
        ddconfig = params['ddconfig']
        unknown = sorted(set(ddconfig) - set(TAMING_DDCONFIG))
        if unknown:
            raise ConversionError(f'{path}: unknown ddconfig keys {unknown}')
        vqgan = {TAMING_DDCONFIG[k]: v for k, v in ddconfig.items()}
        for key in ('n_embed', 'embed_dim'):
            if key not in params:
                raise ConversionError(f'{path}: model.params.{key} is missing')
            vqgan[key] = params[key]
        return vqgan
    if isinstance(cfg.get('network_g'), dict):  # an options file: its VQGAN
        cfg = cfg['network_g']
    vqgan = dict(cfg)
    vqgan.pop('type', None)
    return vqgan


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('input', help='taming .ckpt (or any checkpoint load_state_dict accepts)')
    parser.add_argument('output', help='output .pth or .safetensors')
    parser.add_argument('--keep-discriminator', action='store_true', help='also keep loss.discriminator.*')
    parser.add_argument('--config', help="taming model YAML, a stage-0 options file (network_g) or a flat YAML of "
                        "VQGAN arguments")
    parser.add_argument('--ch', type=int)
    parser.add_argument('--ch-mult', type=int, nargs='+')
    parser.add_argument('--num-res-blocks', type=int)
    parser.add_argument('--z-channels', type=int)
    parser.add_argument('--n-embed', type=int)
    parser.add_argument('--embed-dim', type=int)
    parser.add_argument('--attn-resolutions', type=int, nargs='+')
    parser.add_argument('--resolution', type=int)
    return parser.parse_args(argv)


def build_config(args):
    config = config_from_yaml(args.config) if args.config else dict(F16_1024)
    for name in ('ch', 'ch_mult', 'num_res_blocks', 'z_channels', 'n_embed', 'embed_dim', 'attn_resolutions',
                 'resolution'):
        value = getattr(args, name)
        if value is not None:
            config[name] = value
    return config


def discriminator_config(state_dict):
    """PatchGANDiscriminator arguments read from taming's loss.discriminator.main.<i>.* tensors."""
    convs = [v for k, v in state_dict.items() if k.startswith(DISCRIMINATOR_PREFIX) and k.endswith('.weight')
             and v.dim() == 4]
    if len(convs) < 3:
        raise ConversionError(f'{DISCRIMINATOR_PREFIX}*: expected at least 3 conv weights, found {len(convs)}')
    return dict(
        input_nc=convs[0].shape[1],
        ndf=convs[0].shape[0],
        n_layers=len(convs) - 2,
        use_actnorm=any(k.startswith(DISCRIMINATOR_PREFIX) and k.endswith('.loc') for k in state_dict))


def convert(args):
    from vqir.archs.discriminator_arch import PatchGANDiscriminator
    from vqir.archs.vqgan_arch import VQGAN
    from vqir.utils.checkpoint import CheckpointError, load_state_dict, load_weights, save_state_dict

    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ConversionError(f'{args.output}: output would overwrite the input')
    if not args.output.endswith(('.pth', '.pt', '.safetensors')):
        raise ConversionError(f'{args.output}: output must end in .pth, .pt or .safetensors')
    config = build_config(args)
    try:
        net = VQGAN(**config)
    except (TypeError, ValueError) as err:
        raise ConversionError(f'bad VQGAN configuration {config}: {err}') from None

    try:
        state_dict = load_state_dict(args.input)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    kept = OrderedDict((k, v) for k, v in state_dict.items() if k.startswith(VQGAN_PREFIXES))
    if args.keep_discriminator:
        kept.update((k, v) for k, v in state_dict.items() if k.startswith(DISCRIMINATOR_PREFIX))
    dropped = Counter('.'.join(k.split('.')[:2]) + '.*' for k in state_dict if k not in kept)
    if not kept:
        raise ConversionError(f'{args.input}: no VQGAN tensors (keys starting with {", ".join(VQGAN_PREFIXES)})')

    save_state_dict(kept, args.output)
    try:
        load_weights(net, args.output, strict=True, drop_prefixes=(DISCRIMINATOR_PREFIX, ))
        if args.keep_discriminator:
            disc_keys = [k for k in kept if k.startswith(DISCRIMINATOR_PREFIX)]
            if not disc_keys:
                raise ConversionError(f'{args.input}: --keep-discriminator, but there are no {DISCRIMINATOR_PREFIX}* '
                                      'keys')
            discriminator = PatchGANDiscriminator(**discriminator_config(kept))
            load_weights(
                discriminator, args.output, strict=True, key_map={DISCRIMINATOR_PREFIX: ''},
                drop_prefixes=VQGAN_PREFIXES)
    except (CheckpointError, ConversionError):
        os.remove(args.output)  # never leave a file that failed verification
        raise

    n_params = sum(v.numel() for k, v in kept.items() if k.startswith(VQGAN_PREFIXES))
    print(f'input:   {args.input} ({len(state_dict)} tensors)')
    print(f'config:  {config}')
    print(f'kept:    {len(kept)} tensors, {n_params:,} VQGAN parameters; verified strictly against VQGAN' +
          (' and PatchGANDiscriminator' if args.keep_discriminator else ''))
    print('dropped: ' + (', '.join(f'{g} {n}' for g, n in sorted(dropped.items())) or 'nothing'))
    print(f'output:  {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB)')


def main(argv=None):
    args = parse_args(argv)
    from vqir.utils.checkpoint import CheckpointError
    try:
        convert(args)
    except (ConversionError, CheckpointError, OSError) as err:
        message = str(err).replace('\n  ', '; ')  # CheckpointError lists keys on indented lines
        print(f'error: {message}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
