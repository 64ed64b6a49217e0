"""The cases that run our network alone, each inside its child process: the conv yardstick, down /
up / roundtrip through the Rescaler, the training steps, and float32 against half precision."""
import functools
from collections import OrderedDict

from vqir.inference import Rescaler

from benchmarking.conv_yardstick import add_rates, conv_throughput, conv_yardsticks
from benchmarking.images import max_abs_diff, photo, psnr_y, random_images
from benchmarking.networks import apply_our_flags, build_ours, eager, make_rescaler, tiling_of
from benchmarking.profiling import profiled_operators, top_operators
from benchmarking.sizes import size_name
from benchmarking.timing import measure, median, time_alternately, timing_summary
from benchmarking.training_steps import build_discriminator, build_losses, make_step, training_batch


def run_conv_case(spec, device, peak):
    samples = [conv_throughput(spec, device) for _ in range(3)]
    result = {'conv_gflop_per_s': median(samples), 'samples': samples}
    if spec['dtype'] != 'fp32' or spec['channels_last']:
        result['conv_gflop_per_s_case_format'] = conv_throughput(spec, device, plain=False)
    return result


def run_rescale_case(spec, device, peak):
    """down / up / roundtrip through the Rescaler."""
    net = build_ours(spec, stage=2)
    compiled = apply_our_flags(net, spec, device)
    rescaler = make_rescaler(net, spec, device)
    height, width = spec['size']
    hr = random_images(spec['batch'], height, width, device, spec['seed'] + 2)
    net_h, net_w, tile, tiles = tiling_of(rescaler, height, width)
    op = spec['op']
    if op == 'down':
        fn = lambda: rescaler.downscale(hr)  # noqa: E731
    elif op == 'up':
        lr = rescaler.downscale(hr)
        fn = lambda: rescaler.upscale(lr, out_size=(height, width))  # noqa: E731
    else:
        fn = lambda: rescaler.roundtrip(hr)  # noqa: E731
    yardsticks = conv_yardsticks(spec, device)
    peak.reset()
    result = measure(fn, device, spec['repeats'], spec['warmup'], compiled)
    result.update(peak.peak())
    result.update(processed=size_name((net_h, net_w)), tile=tile, tiles=tiles, **yardsticks)
    if spec['profile']:
        with eager(compiled):
            result['profile'] = top_operators(profiled_operators(fn, device), spec['profile'])
    return add_rates(result, yardsticks['conv_gflop_per_s'])


def run_train_case(spec, device, peak):
    net = build_ours(spec, stage=spec['stage'])
    compiled = apply_our_flags(net, spec, device)
    discriminator = build_discriminator(spec, device) if spec['stage'] == 2 else None
    step = make_step(net, spec, device, build_losses(spec, device), discriminator)
    batch = training_batch(spec, device)
    yardsticks = conv_yardsticks(spec, device)
    peak.reset()
    result = measure(lambda: step(batch), device, spec['repeats'], spec['warmup'], compiled)
    result.update(peak.peak())
    result.update(yardsticks)
    return add_rates(result, yardsticks['conv_gflop_per_s'])


def run_precision_case(spec, device, peak):
    """The round trip of a photo in float32 and in half precision, alternately: speed and PSNR."""
    net = build_ours(spec, stage=2)
    if spec.get('weights'):
        from vqir.utils.checkpoint import load_weights
        load_weights(net, spec['weights'], strict=True, param_key='auto')
    apply_our_flags(net, spec, device)
    half = spec['half_dtype']
    rescalers = OrderedDict((('fp32', Rescaler(net, device=device, tile=spec['tile'], tile_overlap=spec['tile_overlap'])),
                             (half, Rescaler(net, device=device, tile=spec['tile'], tile_overlap=spec['tile_overlap'],
                                             half=half == 'fp16', bf16=half == 'bf16'))))
    height, width = spec['size']
    hr = photo(height, width, device)
    outputs = {name: rescaler.roundtrip(hr) for name, rescaler in rescalers.items()}  # also the warm-up
    for _ in range(max(0, spec['warmup'] - 1)):
        for rescaler in rescalers.values():
            rescaler.roundtrip(hr)
    samples = time_alternately(OrderedDict((name, functools.partial(rescaler.roundtrip, hr))
                                           for name, rescaler in rescalers.items()), device, spec['repeats'])
    (lr32, rec32), (lr_half, rec_half) = [(lr, out['Level_1']) for lr, out in outputs.values()]
    result = {'half_dtype': half, 'weights': spec.get('weights') or 'random', 'processed': size_name((height, width)),
              'psnr_fp32_db': psnr_y(rec32, hr), 'psnr_half_db': psnr_y(rec_half, hr),
              'psnr_half_vs_fp32_db': psnr_y(rec_half, rec32), 'max_abs_diff': max_abs_diff(rec_half, rec32),
              'lr_pixels_differing': int((lr32 != lr_half).any(dim=1).sum()), 'lr_pixels': lr32[0, 0].numel()}
    for name in rescalers:
        result['fp32' if name == 'fp32' else 'half'] = timing_summary(*samples[name])
    return result
