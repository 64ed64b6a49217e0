"""Options files (``vqir/utils/options.py`` and the checks the entry points make before a run): a
mistake is one clear error that names the file and the key, raised before anything is created.

- Training options through vqir/train.py's main: wrong types, unknown keys and typos in the model,
  dataset, network, loss, optimiser, metric and inference blocks, YAML syntax errors and Python tags,
  a missing or binary file: ``error: <file>: ...``, exit status 1, no folder under the root, nothing
  from the file run.
- Test options through vqir/test.py's main: missing weights, test folders and metric weight files.
- Keys a run cannot honour (train keys of another model, path keys of the other entry point, W&B
  without TensorBoard, an unknown mixed precision) as ``OptionsError`` from ``train_pipeline``.

Checks that a class makes of its own arguments stay with that class's tests: the datasets'
(tests/data), the networks' (tests/archs), the models' own ``check_options`` hook (``train.lr_jpeg``'s
values: tests/models/test_lr_jpeg.py) and vqir-rescale's options (tests/cli). That the shipped
options files pass these checks is tested in tests/options/test_option_files.py.
"""
import os
import re
import subprocess
import sys
from os import path as osp

import pytest
import torch
import yaml

from vqir.test_pipeline import main as evaluation_main
from vqir.train_pipeline import build_datasets, train_pipeline
from vqir.utils.options import OptionsError, parse_options

from helpers import ROOT, STAGE0_TRAIN_YML as STAGE0_YML, cli_env, error_lines, parse_train_options, run_train_main
from helpers import stage0_train_argv as train_argv

STAGE1_YML = osp.join(ROOT, 'options', 'train', 'stage1_ifrm_tiny.yml')


# ---------------------------------------------------------------------------------------------- vqir/train.py

with open(STAGE0_YML, encoding='utf-8') as _f:
    STAGE0_TEXT = _f.read()

# (case, text replaced in the tiny stage-0 options, the replacement, what the error line says after the file name)
OPTION_ERRORS = [
    ('num_gpu_word', 'num_gpu: auto', 'num_gpu: two', 'option num_gpu must be "auto" or a non-negative integer, got '
     "'two'"),
    ('cpu_threads_zero', 'num_gpu: auto', 'num_gpu: auto\ncpu_threads: 0',
     'option cpu_threads must be a positive integer (or ~ for one per core), got 0'),
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
    # what only other models read would be ignored silently
    ('inference_in_stage0', '\nlogger:', '\ninference:\n  tile: 64\n\nlogger:',
     'option inference is read only by VQIRModel and VQIRRFModel; VQGANModel would ignore it'),
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
    ('metric_keep_best_set', '  save_img: true', '  save_img: true\n  keep_best: {dataset: demo_train, metric: psnr}',
     "option val:keep_best:dataset must be the name of a validation set (demo_val), got 'demo_train'"),
    ('metric_keep_best_metric', '  save_img: true', '  save_img: true\n  keep_best: {dataset: demo_val, metric: lpips}',
     "option val:keep_best:metric must be an entry of val:metrics (psnr, ssim), got 'lpips'"),
    ('metric_keep_best_form', '  save_img: true', '  save_img: true\n  keep_best: psnr',
     "option val:keep_best must be a mapping with the keys dataset and metric, got 'psnr'"),
]


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
    ('keep_best_in_a_test', ['val:keep_best={dataset: photos, metric: psnr}'],
     'option val:keep_best is read only by train.py; a test run would ignore it'),
]


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


INFERENCE_ERRORS = [
    ('key_typo', 'inference={tiel: 64}', 'option inference:tiel is not a known inference key (did you mean "tile"?)'),
    ('two_precisions', 'inference={half: true, bf16: true}', 'option inference: choose one of half (fp16) and bf16'),
    ('tile_off_the_grid', 'inference={tile: 100}', 'option inference: tile=100: must be 0 (never tile) or a positive '
     'multiple of ir_scale 16'),
]
if not torch.cuda.is_available():
    INFERENCE_ERRORS.append(('fp16_on_cpu', 'inference={half: true}',
                             'option inference: half precision (fp16) needs a CUDA device; running on cpu'))


@pytest.mark.parametrize('case, override, message', INFERENCE_ERRORS, ids=[c[0] for c in INFERENCE_ERRORS])
def test_inference_block_is_checked_before_a_run_starts(tmp_path, case, override, message):
    """The rescaling models check ``inference`` (keys, and settings that can run here) at parse time."""
    with pytest.raises(OptionsError) as err:
        parse_options(str(tmp_path), is_train=True, argv=['-opt', STAGE1_YML, '--force_yml', override])
    assert str(err.value).startswith(f'{STAGE1_YML}: {message}'), err.value
    assert not (tmp_path / 'experiments').exists()


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


# ---------------------------------------------------------------------------------------------- train_pipeline


def _write_variant(tmp_path, old, new):
    with open(STAGE0_YML, encoding='utf-8') as f:
        text = f.read()
    assert old in text
    bad = tmp_path / 'bad.yml'
    bad.write_text(text.replace(old, new, 1), encoding='utf-8')
    return str(bad)


def test_unknown_top_level_key_is_a_clear_error(tmp_path, data_dirs):
    bad = _write_variant(tmp_path, 'model_type: VQGANModel\n', 'model_type: VQGANModel\nfoo: 1\n')
    with pytest.raises(OptionsError, match=f'{bad}: unknown option key "foo"'):
        train_pipeline(str(tmp_path / 'root'), argv=train_argv(data_dirs, yml=bad))
    assert not osp.exists(tmp_path / 'root')


@pytest.mark.parametrize('line, message', [
    ('max_bad_step: 5', 'option train:max_bad_step is not a known train key (did you mean "max_bad_steps"?)'),
    ('codebook_restart_every: 0', 'option train:codebook_restart_every must be a positive integer'),
    ('ema_decay: 0.999', 'option train:ema_decay is read only by VQIRModel and VQIRRFModel; VQGANModel would ignore it'),
])
def test_bad_train_keys_are_clear_errors(tmp_path, data_dirs, line, message):
    bad = _write_variant(tmp_path, '\ntrain:\n', f'\ntrain:\n  {line}\n')
    with pytest.raises(OptionsError, match=re.escape(f'{bad}: {message}')):
        train_pipeline(str(tmp_path / 'root'), argv=train_argv(data_dirs, yml=bad))
    assert not osp.exists(tmp_path / 'root')


def test_string_learning_rate_is_a_clear_error(tmp_path, data_dirs):
    bad = _write_variant(tmp_path, 'lr: !!float 2e-4', 'lr: 1e-4')
    with pytest.raises(OptionsError, match=f'{bad}: option train:optim_g:lr must be a number'):
        train_pipeline(str(tmp_path / 'root'), argv=train_argv(data_dirs, yml=bad))
    assert not osp.exists(tmp_path / 'root')


def test_cli_reports_a_bad_options_file_in_one_line(tmp_path):
    bad = _write_variant(tmp_path, 'model_type: VQGANModel\n', 'model_type: VQGANModel\nfoo: 1\n')
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'vqir', 'train.py'), '-opt', bad], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith('error: ') and bad in lines[0] and '"foo"' in lines[0]
    assert not osp.exists(tmp_path / 'experiments')


@pytest.mark.parametrize('key, message', [
    ('models', 'is set from path:experiments_root (training) or path:results_root (testing); set that instead'),
    ('results_root', 'is read only by test.py; this training run would ignore it'),
])
def test_path_keys_that_a_run_cannot_honour_are_refused(tmp_path, data_dirs, key, message):
    with pytest.raises(OptionsError, match=re.escape(f'{STAGE0_YML}: option path:{key} {message}')):
        train_pipeline(str(tmp_path / 'root'), argv=train_argv(data_dirs, f'path:{key}=somewhere'))
    assert not osp.exists(tmp_path / 'root')


def test_wandb_needs_tensorboard_logging_and_the_package(tmp_path, data_dirs, monkeypatch):
    with pytest.raises(OptionsError, match='option logger:wandb:project needs logger:use_tb_logger: true'):
        train_pipeline(str(tmp_path / 'root'), argv=train_argv(data_dirs, 'logger:wandb={project: p}'))
    monkeypatch.setattr('importlib.util.find_spec', lambda name, *a: None)
    with pytest.raises(OptionsError, match=r'the wandb package is not installed \(pip install wandb\)'):
        train_pipeline(str(tmp_path / 'root'), argv=train_argv(data_dirs, 'logger:use_tb_logger=true',
                                                               'logger:wandb={project: p}'))
    assert not osp.exists(tmp_path / 'root')


def test_lr_jpeg_is_refused_where_nothing_would_read_it(tmp_path, photo_dirs):
    yml = os.path.join(ROOT, 'options', 'train', 'stage0_vqgan_tiny.yml')
    for override, key in (('train:lr_jpeg={quality: [50, 90]}', 'train:lr_jpeg'), ('val:lr_jpeg_quality=75',
                                                                                     'val:lr_jpeg_quality')):
        with pytest.raises(ValueError, match=f'option {key} is read only by VQIRModel and VQIRRFModel'):
            parse_train_options(yml, tmp_path, photo_dirs, override)


def test_mixed_precision_option_is_checked(tmp_path, photo_dirs):
    with pytest.raises(ValueError, match=r'train:mixed_precision must be one of fp32, bf16, fp16 .*got .bfloat16.'):
        parse_train_options(STAGE1_YML, tmp_path, photo_dirs, 'train:mixed_precision=bfloat16')
