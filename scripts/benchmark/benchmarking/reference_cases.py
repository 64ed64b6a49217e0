"""The cases that run ours and the reference side by side, each inside its child process: the
forward, a training iteration, and the peak memory of a large image."""
import copy
import functools
from collections import OrderedDict

import torch

from benchmarking.conv_yardstick import add_rates, conv_throughput
from benchmarking.flops import count_flops
from benchmarking.images import max_abs_diff, random_images
from benchmarking.networks import apply_our_flags, build_ours, eager, make_rescaler, precision_context, tiling_of
from benchmarking.profiling import kernel_ceiling, kernel_time_split, profiled_operators, top_operators
from benchmarking.reference import build_reference, reference_test_tiles, reference_tiled_forward
from benchmarking.sizes import size_name
from benchmarking.timing import measure, median, time_alternately, timing_summary
from benchmarking.training_steps import build_discriminator, build_losses, make_step, training_batch


def run_ref_forward_case(spec, device, peak):
    """Ours and the reference alternately, same weights, same input; agreement; ours' `up`."""
    ours = build_ours(spec, stage=2)
    ref, substitutions = build_reference(spec, 2, ours, device)
    compiled = apply_our_flags(ours, spec, device)
    rescaler = make_rescaler(ours, spec, device, size_mode='mod_crop')
    height, width = spec['size']
    s = spec['scale']
    height, width = height // s * s, width // s * s
    hr01 = random_images(1, height, width, device, spec['seed'] + 2)
    x = hr01 * 2 - 1
    x_ours = x.contiguous(memory_format=torch.channels_last) if spec['channels_last'] else x
    lr01 = rescaler.downscale(hr01)

    def ours_forward():
        with torch.no_grad(), precision_context(device, spec['dtype']):
            return ours(x_ours, is_train=False)

    def ref_forward():  # the reference as published: float32
        with torch.no_grad():
            return ref(x, is_train=False)

    def ours_up():
        return rescaler.upscale(lr01)

    runs = OrderedDict((('ours_forward', ours_forward), ('ref_forward', ref_forward), ('ours_up', ours_up)))
    # the first run of each counts FLOPs and gives the outputs to compare (it is also a warm-up run)
    flops, outputs = {}, {}
    for name, fn in runs.items():
        with eager(compiled):
            flops[name], outputs[name] = count_flops(fn)
    out_ours, out_ref = outputs['ours_forward'], outputs['ref_forward']
    agreement = {k: max_abs_diff(out_ours[k], out_ref[k]) for k in out_ours if k in out_ref}
    agreement['LR_pixels_differing'] = int((out_ours['LR'] != out_ref['LR']).sum())
    agreement['up_Level_1_vs_ref_forward'] = max_abs_diff(outputs['ours_up']['Level_1'] * 2 - 1, out_ref['Level_1'])
    del outputs, out_ours, out_ref
    for _ in range(max(0, spec['warmup'] - 1)):
        for fn in runs.values():
            fn()
    conv_before = conv_throughput(spec, device)
    samples = time_alternately(runs, device, spec['repeats'])
    conv_after = conv_throughput(spec, device)
    conv_gflops = median([conv_before, conv_after])
    result = {'agreement': agreement, 'substitutions': substitutions, 'conv_gflop_per_s': conv_gflops,
              'conv_gflop_per_s_before_after': [conv_before, conv_after], 'processed': size_name((height, width))}
    for name in runs:
        entry = timing_summary(*samples[name])
        entry['flops'] = flops[name]
        result[name] = add_rates(entry, conv_gflops)
    # what the targets can reach with these kernels: one profiled run each
    with eager(compiled):
        events = {name: profiled_operators(fn, device) for name, fn in runs.items()}
    split = {name: kernel_time_split(e, device) for name, e in events.items()}
    result['kernel_split'] = split
    ref_s = result['ref_forward']['median_s']
    result['kernel_ceiling'] = {
        'forward': kernel_ceiling(split['ours_forward'], result['ours_forward']['median_s'], ref_s),
        'up': kernel_ceiling(split['ours_up'], result['ours_up']['median_s'], ref_s)}
    if spec['profile']:
        result['profile'] = {name: top_operators(e, spec['profile']) for name, e in events.items()}
    return result


def run_ref_train_case(spec, device, peak):
    """The same training iteration on ours and on the reference, alternately."""
    stage = spec['stage']
    ours = build_ours(spec, stage=stage)
    ref, substitutions = build_reference(spec, stage, ours, device)
    compiled = apply_our_flags(ours, spec, device)
    disc_ours = build_discriminator(spec, device) if stage == 2 else None
    disc_ref = copy.deepcopy(disc_ours) if stage == 2 else None
    losses = build_losses(spec, device)
    steps = OrderedDict((('ours', make_step(ours, spec, device, losses, disc_ours)),
                         ('ref', make_step(ref, spec, device, losses, disc_ref, dtype='fp32'))))
    batch = training_batch(spec, device)
    first_losses, flops = {}, {}
    for name, step in steps.items():
        torch.manual_seed(spec['seed'] + 11)  # the same LR noise for both (stage 1)
        with eager(compiled if name == 'ours' else ()):
            flops[name], first_losses[name] = count_flops(lambda: step(batch))  # noqa: B023
    for _ in range(max(0, spec['warmup'] - 1)):
        for step in steps.values():
            step(batch)
    conv_before = conv_throughput(spec, device)
    samples = time_alternately(OrderedDict((name, functools.partial(step, batch)) for name, step in steps.items()),
                               device, spec['repeats'])
    conv_after = conv_throughput(spec, device)
    conv_gflops = median([conv_before, conv_after])
    result = {'first_step_losses': first_losses, 'substitutions': substitutions, 'conv_gflop_per_s': conv_gflops}
    for name in steps:
        entry = timing_summary(*samples[name])
        entry['flops'] = flops[name]
        result[name] = add_rates(entry, conv_gflops)
    with eager(compiled):
        split = {name: kernel_time_split(profiled_operators(functools.partial(step, batch), device), device)
                 for name, step in steps.items()}
    result['kernel_split'] = split
    result['kernel_ceiling'] = {'step': kernel_ceiling(split['ours'], result['ours']['median_s'],
                                                       result['ref']['median_s'])}
    return result


def run_ref_memory_case(spec, device, peak):
    """Peak memory at a large size: 'ours' (Rescaler, tiled), 'ours_plain' or 'ref' (plain forward),
    'ref_tiled' (the reference's own test loop)."""
    variant = spec['variant']
    ours = build_ours(spec, stage=2)
    substitutions = []
    if variant in ('ref', 'ref_tiled'):
        net, substitutions = build_reference(spec, 2, ours, device)
        del ours
    else:
        apply_our_flags(ours, spec, device)
        net = ours
    s = spec['scale']
    height, width = spec['size'][0] // s * s, spec['size'][1] // s * s
    hr01 = random_images(1, height, width, device, spec['seed'] + 2)
    result = {'variant': variant, 'processed': size_name((height, width)), 'substitutions': substitutions}
    if variant == 'ours':
        rescaler = make_rescaler(net, spec, device, size_mode='mod_crop')
        _, _, result['tile'], result['tiles'] = tiling_of(rescaler, height, width)
        fn = lambda: rescaler.roundtrip(hr01)  # noqa: E731
    elif variant == 'ref_tiled':
        x = hr01 * 2 - 1
        del hr01
        tiles = reference_test_tiles(height, width, s)
        result['tiles'] = len(tiles)

        def fn():
            with torch.no_grad():
                return reference_tiled_forward(net, x, tiles, s)
    else:
        x = hr01 * 2 - 1
        if variant == 'ours_plain' and spec['channels_last']:
            x = x.contiguous(memory_format=torch.channels_last)
        del hr01

        def fn():
            with torch.no_grad(), precision_context(device, spec['dtype']):
                return net(x, is_train=False)

    peak.reset()
    result.update(measure(fn, device, spec['repeats'], spec['warmup']))
    result.update(peak.peak())
    return result
