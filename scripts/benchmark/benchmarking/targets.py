"""The benchmark's targets (the reference comparison's, and half precision's on a GPU), and whether
the measured cases meet them."""
from collections import OrderedDict

from benchmarking.memory import gb
from benchmarking.report import fmt
from benchmarking.sizes import size_name


# The reference's targets (facts measured on a 2-core AVX2 machine; see the issue / report).
TARGETS = OrderedDict(
    forward_speedup=1.5, conv_fraction=0.85, up_speedup=2.0, memory_ratio=0.5, train_speedup=1.5,
    half_speedup=2.0, half_psnr_db=0.05)


def ceiling_note(result, key):
    """The kernel ceiling (see benchmark.py's docstring) for a target's detail line, when measured."""
    ceiling = result.get('kernel_ceiling', {}).get(key)
    if ceiling is None:
        return ''
    return f'; at most {ceiling:.2f}x while its convolutions and matrix products take the time they took here'


def evaluate_targets(results):
    """The targets against the measured reference comparison (fp32 cases only)."""
    checks = []

    def add(name, value, target, passed, detail):
        checks.append({'target': name, 'value': value, 'required': target, 'passed': passed, 'detail': detail})

    for row in results:
        spec, r = row['spec'], row['result']
        if spec['op'] != 'precision' or spec['device'] != 'cuda' or r.get('status') != 'ok':
            continue  # the half-precision target is a GPU's
        speedup = r['fp32']['median_s'] / r['half']['median_s']
        dpsnr = abs(r['psnr_half_db'] - r['psnr_fp32_db'])
        add('half precision >= 2x faster than fp32, PSNR within 0.05 dB', speedup, TARGETS['half_speedup'],
            speedup >= TARGETS['half_speedup'] and dpsnr <= TARGETS['half_psnr_db'],
            f'{spec["id"]}: {r["half_dtype"]} {r["half"]["median_s"]:.3f} s vs fp32 {r["fp32"]["median_s"]:.3f} s; '
            f'PSNR {r["psnr_half_db"]:.3f} vs {r["psnr_fp32_db"]:.3f} dB ({r["weights"]} weights)')
    results = [row for row in results if row['spec']['dtype'] == 'fp32']
    for row in results:
        spec, r = row['spec'], row['result']
        if r.get('status') != 'ok':
            continue
        where = spec['id']
        if spec['op'] == 'ref_forward':
            o, f, u = r['ours_forward'], r['ref_forward'], r['ours_up']
            speedup = f['median_s'] / o['median_s']
            agree = max(r['agreement'].get('LR', 0.0), r['agreement'].get('Level_1', 0.0))
            add('forward >= 1.5x faster than the reference, same outputs', speedup, TARGETS['forward_speedup'],
                speedup >= TARGETS['forward_speedup'] and agree <= 1e-4,
                f'{where}: {o["median_s"]:.3f} s vs {f["median_s"]:.3f} s; CPU-time ratio '
                f'{f["median_cpu_s"] / o["median_cpu_s"]:.2f}; max |diff| LR/Level_1 {agree:.2e}'
                + ceiling_note(r, 'forward'))
            if o.get('conv_fraction') is not None and f.get('gflops'):
                # the forward's work as the straightforward network counts it (the reference's FLOPs): ours
                # computes fewer (the sub-pixel upsampling convs), which must not count against it
                effective = f['gflops'] / o['median_s']
                fraction = effective / r['conv_gflop_per_s']
                add('forward at >= 85% of the conv throughput', fraction, TARGETS['conv_fraction'],
                    fraction >= TARGETS['conv_fraction'],
                    f'{where}: {f["gflops"]:.0f} GFLOP of the reference forward in {o["median_s"]:.3f} s = '
                    f'{effective:.1f} GFLOP/s vs conv {r["conv_gflop_per_s"]:.1f} GFLOP/s (ours counts '
                    f'{o["gflops"]:.0f} GFLOP: {o["gflop_per_s"]:.1f} GFLOP/s)')
            up = f['median_s'] / u['median_s']
            add('up >= 2x faster than the reference forward', up, TARGETS['up_speedup'], up >= TARGETS['up_speedup'],
                f'{where}: up {u["median_s"]:.3f} s vs reference forward {f["median_s"]:.3f} s'
                + ceiling_note(r, 'up'))
        elif spec['op'] == 'ref_train':
            speedup = r['ref']['median_s'] / r['ours']['median_s']
            add(f'stage-{spec["stage"]} training step >= 1.5x faster', speedup, TARGETS['train_speedup'],
                speedup >= TARGETS['train_speedup'],
                f'{where}: {r["ours"]["median_s"]:.3f} s vs {r["ref"]["median_s"]:.3f} s; CPU-time ratio '
                f'{r["ref"]["median_cpu_s"] / r["ours"]["median_cpu_s"]:.2f}' + ceiling_note(r, 'step'))
    mem = {}
    for row in results:
        spec, r = row['spec'], row['result']
        if spec['op'] == 'ref_memory':
            mem.setdefault((spec['device'], spec['scale'], spec['size']), {})[spec['variant']] = r
    for (device, scale, size), variants in mem.items():
        # the reference as its test loop runs it (tiled) when measured, else its whole-image forward
        ref_variant = 'ref_tiled' if 'ref_tiled' in variants else 'ref'
        ours, ref = variants.get('ours'), variants.get(ref_variant)
        if not ours or not ref or ours.get('status') != 'ok':
            continue
        where = f'{device}/x{scale}/{size_name(size)}'
        if ref.get('status') == 'ok':
            ratio = ours['peak_bytes'] / ref['peak_bytes']
            add('peak memory <= half the reference', ratio, TARGETS['memory_ratio'], ratio <= TARGETS['memory_ratio'],
                f'{where}: {gb(ours["peak_bytes"]):.2f} GB vs {gb(ref["peak_bytes"]):.2f} GB ({ref_variant})')
        else:
            add('peak memory <= half the reference', None, TARGETS['memory_ratio'], None,
                f'{where}: ours {gb(ours["peak_bytes"]):.2f} GB; reference {ref.get("status")}: {ref.get("error")}')
    return checks


def print_targets(checks, out):
    if not checks:
        return
    out('')
    out('Targets')
    for c in checks:
        verdict = {True: 'PASS', False: 'FAIL', None: 'n/a '}[c['passed']]
        value = fmt(c['value'], '.2f')
        out(f"  {verdict} {c['target']}: {value} (required {c['required']}) - {c['detail']}")
