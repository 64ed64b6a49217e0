"""The networks the benchmark runs: the released configuration (or a tiny one for --smoke) with
random weights, the flags that change how they run (--dtype, --channels-last, --compile), and the
Rescaler around them."""
import contextlib
import copy
import inspect
import math
from collections import OrderedDict

import torch

from vqir.archs.vqir_arch import VQIR
from vqir.inference import Rescaler, official_network_options


# A tiny network with the same structure (every part, both MSRM branches) for --smoke.
SMOKE_NETWORK = OrderedDict(
    type='VQIR', in_channels=3, out_channels=3, ch=64, ch_mult=[1, 1, 1, 1, 1], double_z=False, num_res_blocks=1,
    z_channels=64, n_embed=64, embed_dim=64, attn_mult=[1, 1])

# what --compile compiles: the parts that Rescaler(compile=True) compiles
COMPILED_PARTS = ('encoder', 'decoder', 'refine')


def precision_context(device, dtype):
    if dtype == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if dtype == 'bf16' else torch.float16)


def network_options(spec, stage):
    if spec['smoke']:
        opt = copy.deepcopy(SMOKE_NETWORK)
        opt.update(stage=stage, ir_scale=spec['scale'])
        if stage == 1:
            del opt['attn_mult']
        return opt
    return official_network_options(spec['scale'], stage)


def build_ours(spec, stage):
    """Our VQIR with the benchmark's random weights (deterministic from the seed), in eval mode, on CPU."""
    opt = network_options(spec, stage)
    opt.pop('type')
    torch.manual_seed(spec['seed'])
    net = VQIR(**opt)
    generator = torch.Generator().manual_seed(spec['seed'] + 1)
    with torch.no_grad():
        for param in net.parameters():
            if param.requires_grad and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return net.eval()


def apply_our_flags(net, spec, device):
    """--channels-last / --compile on our network (torch's generic mechanisms; see benchmark.py's docstring)."""
    net.to(device)
    if spec['channels_last']:
        net.to(memory_format=torch.channels_last)
    compiled = []
    if spec['compile']:
        for name in COMPILED_PARTS:
            module = getattr(net, name, None)
            if module is not None:
                module.compile()
                compiled.append(module)
    return compiled


@contextlib.contextmanager
def eager(modules):
    """Temporarily run ``Module.compile()``d modules eagerly (FLOP counting, profiling)."""
    saved = [(m, m.__dict__.get('_compiled_call_impl')) for m in modules]
    for m, _ in saved:
        m.__dict__['_compiled_call_impl'] = None
    try:
        yield
    finally:
        for m, impl in saved:
            m.__dict__['_compiled_call_impl'] = impl


def flag_support():
    """Which benchmark flags the project supports itself, and what the benchmark does for the others."""
    params = inspect.signature(Rescaler.__init__).parameters
    support = OrderedDict()
    support['bf16'] = 'Rescaler(bf16=True)' if 'bf16' in params else 'not supported by the Rescaler'
    support['fp16'] = 'Rescaler(half=True), CUDA only' if 'half' in params else 'not supported by the Rescaler'
    support['channels_last'] = ('no Rescaler/VQIR option: the benchmark applies '
                                'Module.to(memory_format=torch.channels_last) to our network')
    support['compile'] = ('Rescaler(compile=True) compiles the encoder, decoder and refine; the benchmark calls '
                          'Module.compile() on the same parts, so that plain forwards and training steps use them too')
    return support


def make_rescaler(net, spec, device, size_mode='pad'):
    kwargs = dict(device=device, tile=spec['tile'], tile_overlap=spec['tile_overlap'], size_mode=size_mode,
                  half=spec['dtype'] == 'fp16', bf16=spec['dtype'] == 'bf16')
    if spec.get('auto_tile_pixels'):
        kwargs['auto_tile_pixels'] = spec['auto_tile_pixels']
    return Rescaler(net, **kwargs)


def tiling_of(rescaler, height, width):
    """(processed H, W, tile core size or None, number of tiles) of the Rescaler for an image."""
    net_h, net_w = rescaler.network_size(height, width)
    tile = rescaler.tile_size(net_h, net_w)
    if tile is None:
        return net_h, net_w, None, 1
    s = rescaler.ir_scale
    count = math.ceil((net_h // s) / (tile // s)) * math.ceil((net_w // s) / (tile // s))
    return net_h, net_w, tile, count
