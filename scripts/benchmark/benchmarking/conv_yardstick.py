"""The machine's own throughput on a plain convolution, the yardstick that the cases' GFLOP/s are
measured against."""
import time

import torch
from torch import nn

from benchmarking.networks import precision_context
from benchmarking.timing import median, sync


CONV_PROBE = dict(channels=128, size=128)  # the plain conv whose throughput is the yardstick
SMOKE_CONV_PROBE_SIZE = 32


def conv_throughput(spec, device, plain=True, repeats=5, warmup=2):
    """GFLOP/s of a plain conv: 128 -> 128 channels, 3x3, 128 x 128 pixels (32 x 32 with --smoke),
    batch 1, inference. ``plain``: float32, NCHW (the yardstick); else in the case's dtype and
    memory format."""
    dtype = 'fp32' if plain else spec['dtype']
    channels_last = False if plain else spec['channels_last']
    c, s = CONV_PROBE['channels'], SMOKE_CONV_PROBE_SIZE if spec['smoke'] else CONV_PROBE['size']
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, 3, padding=1).to(device)
    x = torch.randn(1, c, s, s, device=device)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    flops = 2 * c * c * 9 * s * s
    times = []
    with torch.inference_mode(), precision_context(device, dtype):
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            conv(x)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return flops / median(times) / 1e9


def conv_yardsticks(spec, device):
    """{'conv_gflop_per_s': plain conv, 'conv_gflop_per_s_case_format': same conv in the case's dtype/format}."""
    result = {'conv_gflop_per_s': conv_throughput(spec, device)}
    if spec['dtype'] != 'fp32' or spec['channels_last']:
        result['conv_gflop_per_s_case_format'] = conv_throughput(spec, device, plain=False)
    return result


def add_rates(result, conv_gflops):
    flops = result.get('flops')
    if flops and result.get('median_s'):
        result['gflops'] = flops['total'] / 1e9
        result['gflop_per_s'] = flops['total'] / result['median_s'] / 1e9
        if conv_gflops:
            result['conv_fraction'] = result['gflop_per_s'] / conv_gflops
    return result
