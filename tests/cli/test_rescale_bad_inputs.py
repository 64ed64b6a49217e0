"""vqir-rescale (``python -m vqir.rescale``) on hostile and broken inputs: each broken image file is one
error line naming it (the message the datasets give too, see tests/data/test_dataset_bad_files.py)
and nothing half-made is left; bad options files and weights that would run code are refused; grey+alpha,
16-bit and one-scale-unit images go through; a failing image does not stop the others."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

from vqir.inference import Rescaler
from vqir.rescale import main as rescale_main
from vqir.utils.checkpoint import save_state_dict

from helpers import (BROKEN_CASES, BROKEN_IMAGES, GOOD_PNG, PHOTO, ROOT, RunsFunction, cli_env, create_marker,
                     error_lines, gray_alpha_png)

STAGE2_YML = os.path.join(ROOT, 'options', 'train', 'stage2_msrm_tiny.yml')


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
        (['--opt', inference_typo, '--weights', tiny_weights], f'error: {inference_typo}: option inference:tiel is not a known inference key (did you mean "tile"?)'),
        (['--opt', syntax, '--weights', tiny_weights], f'error: {syntax}: not valid YAML (line 2'),
        (['--opt', STAGE2_YML, '--weights', evil], f'error: {evil}: refused: unpickling it would call '
         f'{create_marker.__module__}.create_marker'),
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
    (folder / 'la.png').write_bytes(gray_alpha_png())
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
