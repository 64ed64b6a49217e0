"""scripts/benchmark/benchmark.py: a --smoke run end to end (every case in its own child process), the
reference comparison against a stand-in reference checkout, and the small helpers of its benchmarking/ modules."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT
BENCHMARK_SCRIPTS = os.path.join(ROOT, 'scripts', 'benchmark')
SCRIPT = os.path.join(BENCHMARK_SCRIPTS, 'benchmark.py')
if BENCHMARK_SCRIPTS not in sys.path:  # the benchmarking/ modules beside the script
    sys.path.insert(0, BENCHMARK_SCRIPTS)
from benchmarking import case_list, profiling, reference, sizes, targets  # noqa: E402

# A stand-in for a checkout of the reference implementation: its layout (DIR/vqir/archs/vqir_arch.py,
# imported as archs.vqir_arch), its constructor signature and its timm import, around our network.
# The same network on both sides must give identical outputs, FLOPs and first training losses.
FAKE_REFERENCE_ARCH = textwrap.dedent('''
    from timm.models.layers import trunc_normal_  # noqa: F401  (the reference imports it)
    from vqir.archs.vqir_arch import VQIR as _OursVQIR


    class VQIR(_OursVQIR):
        def __init__(self, stage, ir_scale, in_channels, out_channels, ch, ch_mult, double_z, num_res_blocks,
                     z_channels, n_embed, embed_dim, attn_mult=None, beta=0.25, remap=None, sane_index_shape=False):
            super().__init__(stage=stage, ir_scale=ir_scale, in_channels=in_channels, out_channels=out_channels,
                             ch=ch, ch_mult=ch_mult, double_z=double_z, num_res_blocks=num_res_blocks,
                             z_channels=z_channels, n_embed=n_embed, embed_dim=embed_dim, attn_mult=attn_mult,
                             beta=beta, remap=remap, sane_index_shape=sane_index_shape)
''')


def load_script():
    spec = importlib.util.spec_from_file_location('vqir_benchmark_script', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def bench():
    return load_script()


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    """One --smoke run with the stand-in reference: (JSON payload, stdout)."""
    tmp = tmp_path_factory.mktemp('bench')
    arch_dir = tmp / 'reference' / 'vqir' / 'archs'
    arch_dir.mkdir(parents=True)
    (arch_dir / '__init__.py').write_text('')
    (arch_dir / 'vqir_arch.py').write_text(FAKE_REFERENCE_ARCH)
    out_json = tmp / 'smoke.json'
    cmd = [sys.executable, SCRIPT, '--smoke', '--device', 'cpu', '--threads', '1', '--reference',
           str(tmp / 'reference'), '--memory-variants', 'ours,ref', '--json', str(out_json)]
    proc = subprocess.run(cmd, cwd=str(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out_json) as f:
        return json.load(f), proc.stdout


def cases_by_id(payload):
    return {row['spec']['id']: row['result'] for row in payload['cases']}


def test_smoke_run_measures_every_case(smoke_run):
    payload, stdout = smoke_run
    cases = cases_by_id(payload)
    expected = {
        'cpu/conv', 'cpu/x16/down/96x64', 'cpu/x16/up/96x64', 'cpu/x16/roundtrip/96x64', 'cpu/x16/train1/b1@64',
        'cpu/x16/train2/b1@64', 'cpu/x16/ref_forward/96x64', 'cpu/x16/ref_train/s1/b1@64',
        'cpu/x16/ref_train/s2/b1@64', 'cpu/x16/ref_memory/ours/96x64', 'cpu/x16/ref_memory/ref/96x64',
        'cpu/x16/precision/96x64'
    }
    assert set(cases) == expected
    assert all(r['status'] == 'ok' for r in cases.values()), {k: r.get('error') for k, r in cases.items()}

    env = payload['environment']
    assert env['threads'] == 1 and env['torch'] == torch.__version__ and env['cpu_model']
    assert cases['cpu/conv']['conv_gflop_per_s'] > 0

    for op in ('down', 'up', 'roundtrip'):
        r = cases[f'cpu/x16/{op}/96x64']
        # --smoke sets 32 px tiles: 96x64 runs as 3 x 2 tiles through the Rescaler
        assert r['processed'] == '96x64' and r['tiles'] == 6
        assert len(r['wall_s']) == 1 and r['median_s'] > 0 and r['median_cpu_s'] > 0
        # the child's resident set includes torch itself: hundreds of MB, never zero
        assert r['peak_bytes'] > 100 * 2**20
        assert r['flops']['total'] > 0 and 0 < r['flops']['conv'] <= r['flops']['total']
        assert r['gflop_per_s'] == pytest.approx(r['flops']['total'] / r['median_s'] / 1e9)
    # upscaling runs the decoder side only, downscaling the encoder side only
    assert 'Decoder' in cases['cpu/x16/up/96x64']['flops']['by_part']
    assert 'Decoder' not in cases['cpu/x16/down/96x64']['flops']['by_part']
    for stage in (1, 2):
        r = cases[f'cpu/x16/train{stage}/b1@64']
        assert r['median_s'] > 0 and r['flops']['by_op'].get('convolution_backward', 0) > 0

    assert 'Targets' in stdout and 'cpu/x16/roundtrip/96x64' in stdout

    # half precision on a CPU is bfloat16; the photo's round trip is compared in PSNR both ways
    prec = cases['cpu/x16/precision/96x64']
    assert prec['half_dtype'] == 'bf16' and prec['weights'] == 'random'
    assert prec['fp32']['median_s'] > 0 and prec['half']['median_s'] > 0
    assert prec['lr_pixels'] == 6 * 4 and 0 <= prec['lr_pixels_differing'] <= prec['lr_pixels']
    assert 0 < prec['psnr_fp32_db'] < 100 and 0 < prec['psnr_half_db'] < 100
    assert prec['max_abs_diff'] > 0 and prec['psnr_half_vs_fp32_db'] > prec['psnr_fp32_db']
    assert 'Half precision' in stdout


def test_smoke_reference_comparison(smoke_run):
    payload, stdout = smoke_run
    cases = cases_by_id(payload)
    fwd = cases['cpu/x16/ref_forward/96x64']
    # same weights, same network: identical outputs and FLOPs; the substitution for timm is recorded
    assert fwd['agreement']['LR'] == 0.0 and fwd['agreement']['Level_1'] == 0.0
    assert fwd['agreement']['LR_pixels_differing'] == 0
    assert fwd['ours_forward']['flops']['total'] == fwd['ref_forward']['flops']['total'] > 0
    assert fwd['ours_forward']['median_s'] > 0 and fwd['ref_forward']['median_s'] > 0 and fwd['ours_up']['median_s'] > 0
    try:
        import timm  # noqa: F401
    except ImportError:
        assert any('timm' in s for s in fwd['substitutions'])
    for stage in (1, 2):
        train = cases[f'cpu/x16/ref_train/s{stage}/b1@64']
        # the same losses (one LPIPS), discriminator copies and noise seed: the same first step
        assert train['first_step_losses']['ours'] == train['first_step_losses']['ref']
        assert train['ours']['flops']['total'] == train['ref']['flops']['total']
    # kernel ceilings: the measured speed-up over the share of ours' profiled time in convolutions and matrix products
    splits = [(fwd, 'ours_forward', 'forward'), (fwd, 'ours_up', 'up')]
    splits += [(cases[f'cpu/x16/ref_train/s{stage}/b1@64'], 'ours', 'step') for stage in (1, 2)]
    for case, ours, key in splits:
        ref = case['ref_forward' if ours.startswith('ours_') else 'ref']
        mine = case['kernel_split'][ours]
        kernels = mine['conv_s'] + mine['matmul_s']
        assert 0 < mine['conv_s'] and 0 <= mine['matmul_s'] and kernels < mine['total_s']
        # the measured speed-up over the share of the kernels: always above the speed-up itself
        speedup = ref['median_s'] / case[ours]['median_s']
        assert case['kernel_ceiling'][key] == pytest.approx(speedup * mine['total_s'] / kernels)
        assert case['kernel_ceiling'][key] > speedup
    assert stdout.count('while its convolutions and matrix products take the time they took here') == 4
    ours_mem, ref_mem = cases['cpu/x16/ref_memory/ours/96x64'], cases['cpu/x16/ref_memory/ref/96x64']
    assert ours_mem['tiles'] == 6 and ref_mem['peak_bytes'] > 0 and ours_mem['peak_bytes'] > 0
    checks = {c['target'] for c in payload['target_checks']}
    assert any('peak memory' in c for c in checks) and any('stage-2 training' in c for c in checks)


def test_case_selection_and_skip(bench):
    args = bench.parse_args(['--smoke', '--only', 'down,train', '--skip', '*/train2/*', '--scales', '16,32'])
    ids = [c['id'] for c in case_list.build_cases(args, ['cpu'])]
    assert ids == ['cpu/conv', 'cpu/x16/down/96x64', 'cpu/x16/train1/b1@64', 'cpu/x32/down/96x64',
                   'cpu/x32/train1/b1@64']
    quick = bench.parse_args(['--quick'])
    assert quick.sizes == [(256, 256), (512, 512)] and quick.repeats == 1 and quick.scales == [16, 32]
    full = bench.parse_args([])
    assert full.sizes[-1] == (1356, 2040) and full.repeats == 3 and full.train_batches == [1, 4]
    with pytest.raises(SystemExit):
        bench.parse_args(['--only', 'ref_forward'])  # reference cases need --reference
    with pytest.raises(SystemExit):
        bench.parse_args(['--only', 'sideways'])


def test_half_precision_target_is_a_gpus():
    def row(device, fp32_s, half_s, psnr_fp32, psnr_half):
        spec = {'op': 'precision', 'device': device, 'dtype': 'fp32', 'id': f'{device}/x16/precision/512x512'}
        result = {'status': 'ok', 'half_dtype': 'fp16', 'weights': 'random', 'fp32': {'median_s': fp32_s},
                  'half': {'median_s': half_s}, 'psnr_fp32_db': psnr_fp32, 'psnr_half_db': psnr_half}
        return {'spec': spec, 'result': result}

    checks = targets.evaluate_targets([row('cuda', 1.0, 0.4, 30.0, 29.96), row('cpu', 1.0, 0.4, 30.0, 29.96)])
    assert [(c['passed'], round(c['value'], 2)) for c in checks] == [(True, 2.5)]  # the CPU row is not judged
    slow, drifting = row('cuda', 1.0, 0.6, 30.0, 30.0), row('cuda', 1.0, 0.4, 30.0, 29.9)
    assert [c['passed'] for c in targets.evaluate_targets([slow, drifting])] == [False, False]


def test_kernel_time_split_sorts_operators():
    """Convolutions and matrix products are told apart from the rest; the ceiling divides by both."""
    x, w, m = torch.randn(1, 16, 64, 64), torch.randn(16, 16, 3, 3), torch.randn(256, 256)

    def fn():
        y = F.conv2d(x, w, padding=1)
        z = torch.mm(m, m)
        return torch.sigmoid(y).sum() + torch.exp(z).sum()

    cpu = torch.device('cpu')
    split = profiling.kernel_time_split(profiling.profiled_operators(fn, cpu), cpu)
    assert split['conv_s'] > 0 and split['matmul_s'] > 0
    assert split['total_s'] > split['conv_s'] + split['matmul_s']  # sigmoid, exp, sums, adds
    # 1.2x measured, two thirds of ours' time in the kernels: 1.8x if the rest took no time
    assert profiling.kernel_ceiling({'total_s': 3.0, 'conv_s': 1.5, 'matmul_s': 0.5}, 2.5, 3.0) == pytest.approx(1.8)
    assert profiling.kernel_ceiling({'total_s': 1.0, 'conv_s': 0.0, 'matmul_s': 0.0}, 2.5, 3.0) is None


def test_parse_size():
    assert sizes.parse_size('512') == (512, 512)
    assert sizes.parse_size('2040x1356') == (1356, 2040)  # width x height -> (H, W)
    assert sizes.size_name((1356, 2040)) == '2040x1356'
    with pytest.raises(Exception):
        sizes.parse_size('big')


def test_reference_checkout_inside_repository_is_refused():
    # the repository itself has vqir/archs/vqir_arch.py, so it looks like a checkout, but lies inside
    with pytest.raises(SystemExit, match='outside'):
        reference.check_reference_dir(ROOT)


def test_minimal_rearrange_matches_permute_and_reshape():
    """The stand-in for einops.rearrange covers the patterns the reference's codebook lookup uses."""
    torch.manual_seed(0)
    z = torch.randn(2, 8, 3, 5)
    assert torch.equal(reference.minimal_rearrange(z, 'b c h w -> b h w c'), z.permute(0, 2, 3, 1))
    assert torch.equal(reference.minimal_rearrange(z.permute(0, 2, 3, 1), 'b h w c -> b c h w'), z)
    emb = torch.randn(16, 8)
    assert torch.equal(reference.minimal_rearrange(emb, 'n d -> d n'), emb.t())
    idx = torch.arange(2 * 3 * 5)
    assert torch.equal(reference.minimal_rearrange(idx, '(b h w) -> b h w', b=2, h=3, w=5), idx.view(2, 3, 5))
    tokens = torch.randn(2, 15, 8)
    assert torch.equal(reference.minimal_rearrange(tokens, 'b (h w) c -> b c h w', h=3),
                       tokens.transpose(1, 2).reshape(2, 8, 3, 5))


def test_reference_tiled_test_loop():
    """The stand-in for the reference's tiled test: its tiles, and for a local network the whole-image result."""
    assert reference.reference_test_tiles(1024, 1024, 16) == [((0, 1024, 0, 1024), (0, 1024, 0, 1024))]
    tiles = reference.reference_test_tiles(1344, 2032, 16)  # 2040x1356 cropped to multiples of 16
    assert tiles == [((0, 1344, 0, 1008), (0, 1344, 0, 1136)), ((0, 1344, 1008, 2032), (0, 1344, 880, 2032))]

    class Local(torch.nn.Module):
        """Outputs that depend on a 3x3 neighbourhood only, at the scales the reference returns."""

        def forward(self, x, is_train=False):
            y = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            return {'LR': F.avg_pool2d(y, 16), 'Level_4': F.avg_pool2d(y, 4), 'Level_1': y}

    torch.manual_seed(0)
    x = torch.rand(1, 3, 1344, 2032)
    whole = Local()(x)
    tiled = reference.reference_tiled_forward(Local(), x, tiles, 16)
    assert list(tiled) == list(whole)
    for name in whole:
        assert tiled[name].shape == whole[name].shape
        assert (tiled[name] - whole[name]).abs().max().item() < 1e-6, name
