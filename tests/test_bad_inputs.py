"""Hostile and broken inputs: each is one clear error line naming the file (and key), a non-zero
exit status, no code from the input run, and nothing half-made left behind.

- Training options: wrong types, unknown keys and typos in the model, dataset, network, loss and
  optimiser blocks, YAML syntax errors, a missing file: ``error: <file>: ...`` and no folder
  under ``experiments/``.
- Checkpoints that would run code when unpickled, given as ``path:pretrain_network_g`` or found
  by ``--auto_resume`` (a training state or the networks beside it), and given to ``vqir-rescale
  --weights``: refused before anything runs.
- Image files (truncated, empty, text, a decompression bomb, a corrupt PNG, grey+alpha, 16-bit)
  through the training dataset (``HRImageDataset``) and ``python -m vqir.rescale down/up``.
"""
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from os import path as osp

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY
from PIL import Image

from vqir.data.hr_image_dataset import HRImageDataset
from vqir.inference import Rescaler
from vqir.rescale import main as rescale_main
from vqir.test_pipeline import main as evaluation_main
from vqir.train_pipeline import build_datasets
from vqir.train_pipeline import main as train_main
from vqir.utils.checkpoint import save_state_dict
from vqir.utils.image_io import ImageReadError
from vqir.utils.options import OptionsError, parse_options

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
STAGE0_YML = osp.join(ROOT, 'options', 'train', 'stage0_vqgan_tiny.yml')
STAGE2_YML = osp.join(ROOT, 'options', 'train', 'stage2_msrm_tiny.yml')
NAME = 'stage0_vqgan_tiny'


def cli_env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith('error: ')]


# ---------------------------------------------------------------------------------------------- options

with open(STAGE0_YML, encoding='utf-8') as _f:
    STAGE0_TEXT = _f.read()

# (case, text replaced in the tiny stage-0 options, the replacement, what the error line says after the file name)
OPTION_ERRORS = [
    ('num_gpu_word', 'num_gpu: auto', 'num_gpu: two', 'option num_gpu must be "auto" or a non-negative integer, got '
     "'two'"),
    ('total_iter_string', 'total_iter: 200', 'total_iter: "5"', 'option train:total_iter must be a positive integer'),
    ('dataset_without_type', '    type: HRImageDataset\n    dataroot_gt: datasets/demo/train',
     '    dataroot_gt: datasets/demo/train', 'option datasets:train:type is required'),
    ('network_keyword_typo', '  ch_mult: [1, 2, 2, 2, 2]', '  ch_mul: [1, 2, 2, 2, 2]',
     "option network_g: VQGAN got an unexpected keyword argument 'ch_mul' (did you mean 'ch_mult'?)"),
    ('network_type_typo', '  type: VQGAN\n', '  type: VQGANN\n',
     'option network_g:type: no network named "VQGANN" (did you mean "VQGAN"?)'),
    ('model_type_typo', 'model_type: VQGANModel', 'model_type: VQGANModle',
     'option model_type: no model named "VQGANModle" (did you mean "VQGANModel"?)'),
    ('loss_keyword_typo', '    disc_weight: 0.8', '    disc_wieght: 0.8',
     "option train:vqgan_loss_opt: VQGANLoss got an unexpected keyword argument 'disc_wieght' (did you mean "
     "'disc_weight'?)"),
    ('optimizer_keyword_typo', '    betas: [0.5, 0.9]\n  optim_d', '    betaz: [0.5, 0.9]\n  optim_d',
     "option train:optim_g: Adam got an unexpected keyword argument 'betaz' (did you mean 'betas'?)"),
    ('optimizer_type_typo', '    type: Adam\n', '    type: Adamm\n',
     'option train:optim_g:type "Adamm" is not a torch.optim optimizer'),
    ('dataset_option_typo', '    gt_size: 64', '    gt_sz: 64',
     "datasets:train: HRImageDataset: unknown dataset option 'gt_sz' (did you mean 'gt_size'?)"),
    ('batch_size_string', 'batch_size_per_gpu: 4', 'batch_size_per_gpu: "4"',
     "option datasets:train:batch_size_per_gpu must be an integer >= 1, got '4'"),
    ('max_bad_steps_string', '  warmup_iter: -1', '  warmup_iter: -1\n  max_bad_steps: "3"',
     "option train:max_bad_steps must be a positive integer, got '3'"),
    ('grad_clip_string', '  warmup_iter: -1', '  warmup_iter: -1\n  grad_clip_norm: "1.0"',
     "option train:grad_clip_norm must be a positive number (or absent), got '1.0'"),
    ('missing_weights', '  pretrain_network_g: ~', '  pretrain_network_g: /nonexistent/net_g.pth',
     'option path:pretrain_network_g: /nonexistent/net_g.pth: no such file'),
    ('yaml_syntax', 'name: stage0_vqgan_tiny', 'name: [stage0_vqgan_tiny',  # the parser stops on the next line
     f'not valid YAML (line {STAGE0_TEXT.splitlines().index("name: stage0_vqgan_tiny") + 2}, column '),
    ('top_level_list', STAGE0_TEXT, '- a\n- b\n', 'expected a mapping of options at the top level, got list'),
    ('batch_larger_than_the_dataset', '    batch_size_per_gpu: 4\n    dataset_enlarge_ratio: 8',
     '    batch_size_per_gpu: 8\n    dataset_enlarge_ratio: 1',
     'datasets:train: 6 images x enlarge ratio 1 is fewer than one batch of 8 per process'),
    ('train_key_of_another_model', '  warmup_iter: -1', '  warmup_iter: -1\n  gan_start_iter: 10',
     'option train:gan_start_iter is read only by VQIRRFModel; VQGANModel would ignore it'),
    ('inference_key_typo', '\nlogger:', '\ninference:\n  tiel: 64\n\nlogger:',
     'option inference:tiel is not a known inference key (did you mean "tile"?)'),
    ('inference_two_precisions', '\nlogger:', '\ninference:\n  half: true\n  bf16: true\n\nlogger:',
     'option inference asks for both half (fp16) and bf16: choose one'),
    # an options file is untrusted input: YAML's Python tags are refused, nothing is run
    ('yaml_python_tag', 'name: stage0_vqgan_tiny', 'name: !!python/object/apply:os.system ["echo ran > RAN"]',
     f'not valid YAML (line {STAGE0_TEXT.splitlines().index("name: stage0_vqgan_tiny") + 1}, column 7): could not '
     "determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ('metric_type_typo', '      type: calculate_psnr', '      type: calculate_psnrr',
     'option val:metrics:psnr:type: no metric named "calculate_psnrr" (did you mean "calculate_psnr"?)'),
    ('metric_without_output', '      output: rec\n      target: gt\n      crop_border: 16\n      test_y_channel: true\n    ssim',
     '      outptu: rec\n      target: gt\n      crop_border: 16\n      test_y_channel: true\n    ssim',
     'option val:metrics:psnr:output is required: the name of the output image (rec, gt)'),
    ('metric_output_typo', '      output: rec\n      target: gt\n      crop_border: 16\n      test_y_channel: true\n    ssim',
     '      output: recc\n      target: gt\n      crop_border: 16\n      test_y_channel: true\n    ssim',
     'option val:metrics:psnr:output: VQGANModel has no image named "recc" (did you mean "rec"?); it has rec, gt'),
    ('metric_argument_missing', '      crop_border: 16\n      test_y_channel: true\n    ssim',
     '      test_y_channel: true\n    ssim',
     "option val:metrics:psnr: calculate_psnr missing a required argument: 'crop_border'"),
    ('saved_output_typo', '  save_img: true', '  save_img: true\n  outputs: [Rec]',
     'option val:outputs: VQGANModel has no image named "Rec" (did you mean "rec"?); it has rec, gt'),
]


def run_train_main(argv, capsys):
    """vqir/train.py's main in this process -> (exit status, stderr)."""
    with pytest.raises(SystemExit) as stop:
        train_main(argv)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize('case, old, new, message', OPTION_ERRORS, ids=[c[0] for c in OPTION_ERRORS])
def test_option_errors_are_one_line_and_create_nothing(tmp_path, demo, capsys, case, old, new, message):
    assert old in STAGE0_TEXT
    bad = tmp_path / 'bad.yml'
    bad.write_text(STAGE0_TEXT.replace(old, new, 1), encoding='utf-8')
    root = tmp_path / 'root'
    argv = ['-opt', str(bad)]
    if case not in ('yaml_syntax', 'top_level_list'):
        # a short run, should the option be accepted after all
        short = [] if case == 'total_iter_string' else ['train:total_iter=1']
        if not case.startswith(('metric_', 'saved_output')):  # those need the val section
            short.append('val=~')
        argv += ['--force_yml', f'path:root={root}', f'datasets:train:dataroot_gt={demo}/train',
                 f'datasets:val:dataroot_gt={demo}/val', *short]
    status, err = run_train_main(argv, capsys)
    assert status == 1
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f'error: {bad}: {message}'), err
    assert 'Traceback' not in err
    assert not root.exists()
    assert not (tmp_path / 'RAN').exists() and not osp.exists('RAN')


TEST_STAGE0_YML = osp.join(ROOT, 'options', 'test', 'test_stage0_vqgan_tiny.yml')
# (case, --force_yml entries, what the error line says after the options file's name)
TEST_PIPELINE_ERRORS = [
    ('missing_weights', ['path:pretrain_network_g=/nonexistent/net_g.pth'],
     'option path:pretrain_network_g: /nonexistent/net_g.pth: no such file'),
    ('missing_test_folder', ['datasets:test_1:dataroot_gt=/nonexistent/photos'], 'datasets:test_1: '),
    ('missing_lpips_backbone', ['val:metrics:lpips={type: calculate_lpips, output: rec, target: gt}'],
     "option val:metrics:lpips: LPIPS 'vgg' (its ImageNet backbone) needs the weights file 'vgg16-397923af.pth'"),
    ('missing_dists_weights', ['val:metrics:dists={type: calculate_dists, output: rec, target: gt}'],
     "option val:metrics:dists: DISTS (its ImageNet VGG16) needs the weights file 'vgg16-397923af.pth'"),
    ('missing_inception_weights', ['val:metrics:fid={type: calculate_fid, output: rec, target: gt}'],
     'option val:metrics:fid: FID / KID (the Inception-V3 of torch-fidelity) needs the weights file '
     "'weights-inception-2015-12-05-6726825d.pth'"),
]
if not torch.cuda.is_available():
    TEST_PIPELINE_ERRORS.append(('fp16_on_cpu', ['inference={half: true}'],
                                 'option inference:half needs a CUDA device (fp16 autocast); on a CPU use bf16'))


@pytest.mark.parametrize('case, overrides, message', TEST_PIPELINE_ERRORS, ids=[c[0] for c in TEST_PIPELINE_ERRORS])
def test_test_pipeline_errors_are_one_line_and_create_nothing(tmp_path, demo, capsys, monkeypatch, case, overrides,
                                                              message):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty_torch_home'))
    weights = tmp_path / 'net_g.pth'
    weights.write_bytes(b'never read')
    root = tmp_path / 'root'
    with pytest.raises(SystemExit) as stop:
        evaluation_main(['-opt', TEST_STAGE0_YML, '--force_yml', f'path:root={root}',
                         f'path:pretrain_network_g={weights}', f'datasets:test_1:dataroot_gt={demo}/val', *overrides])
    lines = error_lines(capsys.readouterr().err)
    assert stop.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f'error: {TEST_STAGE0_YML}: {message}'), lines
    assert not root.exists()


def test_metric_arguments_are_checked_as_the_metric_is_called(tmp_path, demo):
    """calculate_metric passes the images by name: NIQE (one image, then crop_border) is valid."""
    opt, _ = parse_options(str(tmp_path), is_train=False, argv=[
        '-opt', TEST_STAGE0_YML, '--force_yml', f'datasets:test_1:dataroot_gt={demo}/val',
        'val:metrics:niqe={type: calculate_niqe, output: rec, target: gt, crop_border: 0}'])
    assert opt['val']['metrics']['niqe']['crop_border'] == 0


def test_batch_check_counts_every_gpu_of_a_data_parallel_process(demo):
    """Without a launcher basicsr's loader puts num_gpu batches into one: 6 photos < 2 x 4."""
    with open(osp.join(ROOT, 'options', 'train', 'stage0_vqgan_tiny.yml'), encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    train = dict(opt['datasets']['train'], dataroot_gt=f'{demo}/train', dataset_enlarge_ratio=1, phase='train')
    opt['datasets'] = {'train': train}
    opt.update(dist=False, world_size=1, rank=0, num_gpu=1)
    build_datasets(opt, 'x.yml')  # 6 >= 4
    opt['num_gpu'] = 2
    with pytest.raises(OptionsError, match='6 images x enlarge ratio 1 is fewer than one batch of 8 per process'):
        build_datasets(opt, 'x.yml')


def test_missing_and_binary_options_files(tmp_path, capsys):
    missing = tmp_path / 'nope.yml'
    status, err = run_train_main(['-opt', str(missing)], capsys)
    assert status == 1 and error_lines(err) == [f'error: {missing}: options file not found']
    binary = tmp_path / 'binary.yml'
    binary.write_bytes(b'\xff\xfe\x00\x81 not text')
    status, err = run_train_main(['-opt', str(binary)], capsys)
    assert status == 1 and error_lines(err) == [f'error: {binary}: not a text file']
    assert sorted(os.listdir(tmp_path)) == ['binary.yml']


def test_cli_network_typo_is_one_line_not_a_traceback(tmp_path, demo):
    bad = tmp_path / 'typo.yml'
    bad.write_text(STAGE0_TEXT.replace('  ch_mult: [1, 2, 2, 2, 2]', '  ch_mul: [1, 2, 2, 2, 2]'), encoding='utf-8')
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'vqir', 'train.py'), '-opt', str(bad), '--force_yml',
                           f'path:root={tmp_path / "root"}', f'datasets:train:dataroot_gt={demo}/train',
                           f'datasets:val:dataroot_gt={demo}/val'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180, env=cli_env())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: option network_g: VQGAN got an unexpected keyword argument 'ch_mul' (did you mean 'ch_mult'?)"]
    assert sorted(os.listdir(tmp_path)) == ['typo.yml']  # no root, no experiments/


# ---------------------------------------------------------------------------------------------- checkpoints


def create_marker(path):
    """What a malicious checkpoint runs when it is unpickled: it leaves a file behind."""
    with open(path, 'w', encoding='utf-8') as f:
        f.write('code ran')


class RunsFunction:
    """Unpickling calls create_marker (an importable function, as an attacker's module would be)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return create_marker, (self.marker, )


class RunsShell:
    """Unpickling runs a shell command (os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


class RunsExec:
    """Unpickling runs Python source (builtins.exec)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("code ran")', )


PAYLOADS = [RunsFunction, RunsShell, RunsExec]


def stage0_argv(demo, root, *force, extra=()):
    return ['-opt', STAGE0_YML, *extra, '--force_yml', f'path:root={root}', f'datasets:train:dataroot_gt={demo}/train',
            f'datasets:val:dataroot_gt={demo}/val', 'datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2',
            'network_g:ch_mult=[1,1,1,1,1]', 'network_d:ndf=8', 'val=~', 'logger:pbar=false', *force]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, demo):
    """A finished 2-iteration run (checkpoints and a training state at iteration 2), copied per test."""
    root = tmp_path_factory.mktemp('trained')
    train_main(stage0_argv(demo, root, 'train:total_iter=2', 'logger:save_checkpoint_freq=2'))
    return str(root)


def _copy_tree(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _listing(folder):
    return sorted(osp.relpath(osp.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


@pytest.mark.parametrize('payload', PAYLOADS, ids=[p.__name__ for p in PAYLOADS])
def test_malicious_pretrained_weights_are_refused(tmp_path, demo, trained, capsys, payload):
    marker = tmp_path / 'marker'
    good = torch.load(osp.join(trained, 'experiments', NAME, 'models', 'net_g_2.pth'), weights_only=True)
    evil = tmp_path / 'evil.pth'
    torch.save({'params': good['params'], 'extra': payload(marker)}, evil)
    status, err = run_train_main(stage0_argv(demo, tmp_path / 'root', 'train:total_iter=2',
                                             f'path:pretrain_network_g={evil}'), capsys)
    assert status == 1
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f'error: {evil}: refused'), err
    assert not marker.exists()
    models = tmp_path / 'root' / 'experiments' / NAME / 'models'
    assert not models.exists() or os.listdir(models) == []  # no training step ran, nothing was saved


@pytest.mark.parametrize('target', ['training_states/2.state', 'models/net_g_2.pth'])
def test_malicious_files_found_by_auto_resume_are_refused(tmp_path, demo, trained, capsys, target):
    root = _copy_tree(trained, tmp_path / 'root')
    path = osp.join(root, 'experiments', NAME, target)
    marker = tmp_path / 'marker'
    obj = torch.load(path, weights_only=True)
    obj['extra'] = RunsFunction(marker)
    torch.save(obj, path)
    status, err = run_train_main(stage0_argv(demo, root, 'train:total_iter=4', extra=['--auto_resume']), capsys)
    assert status == 1
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f'error: {path}: refused: unpickling it would call '
                                                   f'{__name__}.create_marker'), err
    assert not marker.exists()
    assert not osp.exists(osp.join(root, 'experiments', NAME, 'training_states', '4.state'))


def test_cli_auto_resume_refuses_a_state_that_runs_a_shell_command(tmp_path, demo, trained):
    root = _copy_tree(trained, tmp_path / 'root')
    exp = osp.join(root, 'experiments', NAME)
    state_path = osp.join(exp, 'training_states', '2.state')
    marker = tmp_path / 'marker'
    state = torch.load(state_path, weights_only=True)
    state['extra'] = RunsShell(marker)
    torch.save(state, state_path)
    before = _listing(exp)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'vqir', 'train.py'),
                           *stage0_argv(demo, root, 'train:total_iter=4', extra=['--auto_resume'])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180, env=cli_env())
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: {state_path}: refused: the file references posix.system'), \
        proc.stderr
    assert not marker.exists()
    assert _listing(exp) == before  # nothing ran: no log, no checkpoint


# ---------------------------------------------------------------------------------------------- image files


def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_bomb(width, height):
    """A valid-looking PNG of a few dozen bytes whose header claims width x height RGB pixels."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr) + _png_chunk(b'IDAT', zlib.compress(b'\x00' * 64)) +
            _png_chunk(b'IEND', b''))


def _photo(height=40, width=48):
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return base  # smooth BGR uint8


PHOTO = _photo()
GOOD_PNG = cv2.imencode('.png', PHOTO)[1].tobytes()


def _gray_alpha_png():
    gray_alpha = np.dstack([PHOTO[:, :, 1], np.linspace(0, 255, PHOTO.shape[1], dtype=np.uint8)[None].repeat(40, 0)])
    out = io.BytesIO()
    Image.fromarray(gray_alpha, 'LA').save(out, 'PNG')
    return out.getvalue()


def _corrupt_idat_png():
    """Complete chunk structure (ends with IEND) but the compressed pixel data is garbage."""
    return GOOD_PNG[:60] + bytes(len(GOOD_PNG) - 72) + GOOD_PNG[-12:]


BROKEN_IMAGES = {  # name: content
    'truncated.png': GOOD_PNG[:len(GOOD_PNG) // 2],
    'empty.png': b'',
    'text.png': b'this is a text file, not an image\n',
    'bomb.png': png_bomb(100000, 100000),
    'corrupt.png': _corrupt_idat_png(),
}

# (file, message after "<path>: "): the same from vqir.rescale and from the datasets (one reader)
BROKEN_CASES = [
    ('truncated.png', 'truncated PNG file (it has no IEND chunk)'),
    ('empty.png', 'empty file'),
    ('text.png', 'not an image, or a format that cannot be decoded'),
    ('bomb.png', 'image is 100000x100000 = 10,000,000,000 pixels, more than the limit of 400,000,000 (possible '
     'decompression bomb'),
    ('corrupt.png', 'PNG data cannot be decoded (truncated or corrupt file)'),
]


def _dataset(folder, phase):
    return HRImageDataset({'phase': phase, 'dataroot_gt': str(folder), 'ir_scale': 16, 'gt_size': 32,
                           'io_backend': {'type': 'disk'}})


@pytest.mark.parametrize('name, message', BROKEN_CASES)
@pytest.mark.parametrize('phase', ['train', 'val'])
def test_dataset_names_the_broken_file(tmp_path, name, message, phase):
    path = tmp_path / name
    path.write_bytes(BROKEN_IMAGES[name])
    dataset = _dataset(tmp_path, phase)
    with pytest.raises(ImageReadError) as err:  # an InputError: the entry points report it in one line
        dataset[0]
    assert str(err.value).startswith(f'{path}: {message}') and '\n' not in str(err.value)


def test_dataset_reads_gray_alpha_and_16_bit(tmp_path):
    (tmp_path / 'la.png').write_bytes(_gray_alpha_png())
    rgb16 = PHOTO.astype(np.uint16) * 257 + 3  # values no 8-bit image has
    cv2.imwrite(str(tmp_path / 'rgb16.png'), rgb16)
    items = {osp.basename(item['gt_path']): item for item in _dataset(tmp_path, 'val')}
    gray = torch.from_numpy(PHOTO[:, :, 1].astype(np.float32) / 255.)
    for c in range(3):  # grey repeated, alpha dropped
        torch.testing.assert_close(items['la.png']['gt'][c], gray)
    expected16 = torch.from_numpy(rgb16[:, :, ::-1].astype(np.float32) / 65535.).permute(2, 0, 1)
    torch.testing.assert_close(items['rgb16.png']['gt'], expected16)
    assert items['la.png']['lq'].shape == items['rgb16.png']['lq'].shape == (3, 3, 3)


@pytest.fixture(scope='module')
def tiny_weights(tmp_path_factory):
    """A randomly initialised tiny stage-2 VQIR (the network of stage2_msrm_tiny.yml)."""
    with open(STAGE2_YML, encoding='utf-8') as f:
        net_opt = dict(yaml.safe_load(f)['network_g'])
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
    path = tmp_path_factory.mktemp('weights') / 'tiny_stage2.pth'
    save_state_dict(net, str(path), param_key='params')
    return str(path)


def run_rescale(capsys, *argv):
    status = rescale_main([str(a) for a in argv])
    return status, capsys.readouterr().err


def _net(tiny_weights, opt=STAGE2_YML):
    return ['--opt', opt, '--weights', tiny_weights, '--device', 'cpu']


@pytest.mark.parametrize('command', ['down', 'up'])
@pytest.mark.parametrize('name, message', BROKEN_CASES)
def test_rescale_reports_the_broken_file_and_writes_nothing(tmp_path, tiny_weights, capsys, command, name, message):
    path = tmp_path / name
    path.write_bytes(BROKEN_IMAGES[name])
    out = tmp_path / 'out'
    status, err = run_rescale(capsys, command, path, '-o', out, *_net(tiny_weights))
    assert status == 1
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f'error: {path}: {message}'), err
    assert not out.exists() or os.listdir(out) == []


def _write_yaml(path, content):
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(content, f)
    return str(path)


def test_rescale_options_and_weights_errors(tmp_path, tiny_weights, capsys):
    with open(STAGE2_YML, encoding='utf-8') as f:
        options = yaml.safe_load(f)
    photo = tmp_path / 'photo.png'
    photo.write_bytes(GOOD_PNG)
    unknown_key = _write_yaml(tmp_path / 'unknown.yml', dict(options, netwrok_d=options['network_d']))
    inference_typo = _write_yaml(tmp_path / 'inference.yml', dict(options, inference={'tiel': 64}))
    syntax = tmp_path / 'syntax.yml'
    syntax.write_text('network_g: {type: VQIR\n', encoding='utf-8')
    marker = tmp_path / 'marker'
    evil = tmp_path / 'evil.pth'
    torch.save({'params': torch.load(tiny_weights, weights_only=True)['params'], 'x': RunsFunction(marker)}, evil)
    cases = [
        (['--opt', unknown_key, '--weights', tiny_weights], f'error: {unknown_key}: unknown option key "netwrok_d"'),
        (['--opt', inference_typo, '--weights', tiny_weights], f'error: {inference_typo}: inference:tiel is not a known key'),
        (['--opt', syntax, '--weights', tiny_weights], f'error: {syntax}: not valid YAML (line 2'),
        (['--opt', STAGE2_YML, '--weights', evil], f'error: {evil}: refused: unpickling it would call '
         f'{__name__}.create_marker'),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f'out{i}'
        status, err = run_rescale(capsys, 'down', photo, '-o', out, *args, '--device', 'cpu')
        assert status == 1
        lines = error_lines(err)
        assert len(lines) == 1 and lines[0].startswith(message), (message, err)
        assert not out.exists()
    assert not marker.exists()


def test_rescale_handles_gray_alpha_and_16_bit(tmp_path, tiny_weights, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    (folder / 'la.png').write_bytes(_gray_alpha_png())
    cv2.imwrite(str(folder / 'rgb16.png'), PHOTO.astype(np.uint16) * 257)
    status, err = run_rescale(capsys, 'down', folder, '-o', tmp_path / 'lr', *_net(tiny_weights))
    assert status == 0, err
    la_lr = cv2.imread(str(tmp_path / 'lr' / 'la.png'), cv2.IMREAD_UNCHANGED)
    rgb16_lr = cv2.imread(str(tmp_path / 'lr' / 'rgb16.png'), cv2.IMREAD_UNCHANGED)
    assert la_lr.shape == (3, 3, 4) and la_lr.dtype == np.uint8  # the alpha travels with the LR
    assert rgb16_lr.shape == (3, 3, 3) and rgb16_lr.dtype == np.uint8  # the LR is always 8-bit
    status, err = run_rescale(capsys, 'up', tmp_path / 'lr', '-o', tmp_path / 'rebuilt', '--bit-depth', '16',
                              *_net(tiny_weights))
    assert status == 0, err
    rebuilt_la = cv2.imread(str(tmp_path / 'rebuilt' / 'la.png'), cv2.IMREAD_UNCHANGED)
    assert rebuilt_la.shape == (40, 48, 4) and rebuilt_la.dtype == np.uint16  # grey+alpha comes back as RGBA
    rebuilt16 = cv2.imread(str(tmp_path / 'rebuilt' / 'rgb16.png'), cv2.IMREAD_UNCHANGED)
    assert rebuilt16.shape == (40, 48, 3) and rebuilt16.dtype == np.uint16


def test_rescale_up_refuses_an_lr_whose_output_is_a_bomb(tmp_path, tiny_weights, capsys, monkeypatch):
    lr = tmp_path / 'huge_lr.png'
    cv2.imwrite(str(lr), np.full((1600, 1600, 3), 128, np.uint8))
    assert lr.stat().st_size < 100_000

    def must_not_run(self, *args, **kwargs):
        raise AssertionError('up started to build a 25600x25600 image')

    monkeypatch.setattr(Rescaler, 'upscale', must_not_run)  # the test never allocates the real thing
    status, err = run_rescale(capsys, 'up', lr, '-o', tmp_path / 'out', *_net(tiny_weights))
    assert status == 1 and error_lines(err)[0].startswith(f'error: {lr}: ') and 'pixels' in err


def test_cli_folder_of_broken_files_exit_status(tmp_path, tiny_weights):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    for name, content in BROKEN_IMAGES.items():
        (folder / name).write_bytes(content)
    (folder / 'good.png').write_bytes(GOOD_PNG)
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, '-m', 'vqir.rescale', 'down', str(folder), '-o', str(out),
                           *_net(tiny_weights)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=cli_env())
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == len(BROKEN_CASES), proc.stderr
    for name, message in BROKEN_CASES:
        assert [line for line in lines if line.startswith(f'error: {folder / name}: {message}')], (name, proc.stderr)
    assert os.listdir(out) == ['good.png']  # every good file, no partial or temporary file


# ---------------------------------------------------------------------------------------------- one scale unit
# basicsr's MATLAB imresize fails (RuntimeError: "The size of tensor a (24) must match the size of tensor b (16)")
# when a side of its input is shorter than its kernel's reach (a side of one scale unit, 16 pixels at 1/16, for
# one). Every image with a side of 1 to 16 pixels reaches it that way once padded to a multiple of the scale.


def test_rescale_down_rgba_with_a_16_pixel_side(tmp_path, tiny_weights, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    rgba = np.dstack([PHOTO[:16], np.full((16, 48), 200, np.uint8)])
    cv2.imwrite(str(folder / 'a_strip.png'), rgba)
    cv2.imwrite(str(folder / 'b_photo.png'), PHOTO)
    status, err = run_rescale(capsys, 'down', folder, '-o', tmp_path / 'lr', *_net(tiny_weights))
    assert status == 0, err
    strip_lr = cv2.imread(str(tmp_path / 'lr' / 'a_strip.png'), cv2.IMREAD_UNCHANGED)
    assert strip_lr.shape == (1, 3, 4)
    assert np.all(np.abs(strip_lr[:, :, 3].astype(int) - 200) <= 1)  # a constant alpha stays constant
    assert sorted(os.listdir(tmp_path / 'lr')) == ['a_strip.png', 'b_photo.png']


def test_dataset_lq_of_an_image_with_a_16_pixel_side(tmp_path):
    cv2.imwrite(str(tmp_path / 'strip.png'), np.full((16, 48, 3), 90, np.uint8))
    item = _dataset(tmp_path, 'val')[0]
    assert item['gt'].shape == (3, 16, 48) and item['lq'].shape == (3, 1, 3)
    torch.testing.assert_close(item['lq'], torch.full((3, 1, 3), 90 / 255.))  # a flat image stays flat


# ---------------------------------------------------------------------------------------------- tracebacks

_PIPELINE_SCRIPT = '''
import sys
from vqir.utils.entry_point import run_pipeline
from vqir.utils.options import OptionsError
from vqir.utils.run_logger import init_run_logger

def pipeline(root, argv):
    init_run_logger(sys.argv[1])
    if sys.argv[2] == 'user':
        raise OptionsError('bad.yml: option train:lr is not a number')
    raise RuntimeError('size mismatch in a layer (a bug)')

run_pipeline(pipeline)
'''


@pytest.mark.parametrize('kind', ['user', 'fault'])
def test_user_errors_are_one_line_and_faults_keep_their_traceback(tmp_path, kind):
    """A user's mistake: one error line on the terminal and in the run log. Anything else (here a
    RuntimeError, as a shape bug or a CUDA out-of-memory raise): the traceback on both."""
    log = tmp_path / 'run.log'
    env = {k: v for k, v in cli_env().items() if k != 'VQIR_TRACEBACK'}
    proc = subprocess.run([sys.executable, '-c', _PIPELINE_SCRIPT, str(log), kind], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    logged = log.read_text()
    assert proc.returncode == 1, proc.stderr
    if kind == 'user':
        assert error_lines(proc.stderr) == ['error: bad.yml: option train:lr is not a number'], proc.stderr
        assert 'Traceback' not in proc.stderr + logged
        assert 'error: bad.yml: option train:lr is not a number' in logged
    else:
        for text in (proc.stderr, logged):
            assert 'Traceback (most recent call last)' in text and 'RuntimeError: size mismatch in a layer' in text
        assert not error_lines(proc.stderr)


@pytest.mark.parametrize('message, traceback_expected', [
    ('size mismatch in a layer (a bug)', True),
    ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     '68719476736 bytes', False),
])
def test_rescale_reports_a_failing_image_and_goes_on(tmp_path, tiny_weights, capsys, monkeypatch, message,
                                                    traceback_expected):
    """vqir-rescale goes on with the other images; a fault keeps its traceback, running out of CPU memory
    (a RuntimeError too) is one line."""
    folder = tmp_path / 'in'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a_fails.png'), PHOTO)
    cv2.imwrite(str(folder / 'b_photo.png'), PHOTO)
    real_downscale = Rescaler.downscale

    def downscale(self, hr):
        if getattr(downscale, 'first', True):
            downscale.first = False
            raise RuntimeError(message)
        return real_downscale(self, hr)

    monkeypatch.setattr(Rescaler, 'downscale', downscale)
    status, err = run_rescale(capsys, 'down', folder, '-o', tmp_path / 'lr', *_net(tiny_weights))
    assert status == 1 and os.listdir(tmp_path / 'lr') == ['b_photo.png']
    assert error_lines(err) == [f'error: {folder / "a_fails.png"}: {message}'], err
    assert (f'RuntimeError: {message}' in err) == traceback_expected, err  # the traceback's last line
