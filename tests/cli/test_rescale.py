"""The vqir-rescale command (python -m vqir.rescale) and Rescaler.from_weights, with tiny networks."""
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY
from skimage import data as skdata

from vqir.inference import Rescaler
from vqir.rescale import main
from vqir.utils.checkpoint import CheckpointError, save_state_dict
from vqir.utils.image_io import read_image

TINY = dict(type='VQIR', stage=2, ir_scale=16, in_channels=3, out_channels=3, ch=64, ch_mult=[1, 1, 1, 1, 1],
            double_z=False, num_res_blocks=1, z_channels=64, n_embed=64, embed_dim=64, attn_mult=[1, 1])


def _build(**changes):
    opt = dict(TINY, **changes)
    return ARCH_REGISTRY.get('VQIR')(**{k: v for k, v in opt.items() if k != 'type'})


def _write_yaml(path, content):
    with open(path, 'w') as f:
        yaml.safe_dump(content, f)
    return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Tiny 16x/32x checkpoints and options files, and a few input images."""
    root = tmp_path_factory.mktemp('rescale')
    torch.manual_seed(0)
    net16 = _build()
    save_state_dict(net16, str(root / 'tiny16.pth'), param_key='params')  # basicsr layout
    torch.manual_seed(1)
    save_state_dict(_build(ir_scale=32), str(root / 'tiny32.pth'))  # the reference's plain state_dict
    torch.manual_seed(2)
    save_state_dict(_build(stage=1, attn_mult=None), str(root / 'tiny16_stage1.pth'))
    f = {
        'root': root,
        'weights16': str(root / 'tiny16.pth'),
        'weights32': str(root / 'tiny32.pth'),
        'weights16_stage1': str(root / 'tiny16_stage1.pth'),
        'opt16': _write_yaml(root / 'tiny16.yml', {'name': 'tiny', 'network_g': TINY}),
        'opt32': _write_yaml(root / 'tiny32.yml', {'network_g': dict(TINY, ir_scale=32)}),
    }
    images = root / 'images'
    images.mkdir()
    photo = cv2.resize(skdata.astronaut(), (76, 100), interpolation=cv2.INTER_AREA)  # (100, 76, 3) RGB
    cv2.imwrite(str(images / 'photo.png'), photo[:, :, ::-1])
    f['photo'] = str(images / 'photo.png')
    return f


@pytest.fixture(scope='module')
def rescaler(files):
    return Rescaler.from_weights(files['weights16'], opt=TINY, device='cpu')


def run(capsys, *argv):
    """main(argv) -> (exit status, stderr)."""
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def _to_tensor(img):
    return torch.from_numpy(img.transpose(2, 0, 1).copy())[None]


def _as_saved(img01):
    """What write_image stores for a (1, 3, H, W) RGB result: clamped, x 255, rounded, uint8 BGR."""
    rgb = np.clip(img01[0].permute(1, 2, 0).numpy(), 0., 1.)
    return np.round(rgb[:, :, ::-1] * 255.).astype(np.uint8)


def _net_args(files):
    return ['--opt', files['opt16'], '--weights', files['weights16']]


# ------------------------------------------------------------------------------------------ round trips


def test_down_then_up_through_png_equals_the_in_memory_round_trip(files, rescaler, tmp_path, capsys):
    status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'lr', *_net_args(files))
    assert status == 0, err
    lr_file = tmp_path / 'lr' / 'photo.png'
    lr_img = cv2.imread(str(lr_file), cv2.IMREAD_UNCHANGED)
    assert lr_img.dtype == np.uint8 and lr_img.shape == (7, 5, 3)

    hr, _ = read_image(files['photo'])
    lr, outputs = rescaler.roundtrip(_to_tensor(hr))
    assert np.array_equal(lr_img, _as_saved(lr))  # the PNG holds exactly the in-memory LR
    _, info = read_image(str(lr_file))
    assert info.text['vqir:original_size'] == '76x100' and info.text['vqir:ir_scale'] == '16'

    status, err = run(capsys, 'up', lr_file, '-o', tmp_path / 'up', *_net_args(files))
    assert status == 0, err
    rebuilt = cv2.imread(str(tmp_path / 'up' / 'photo.png'), cv2.IMREAD_UNCHANGED)
    assert rebuilt.shape == (100, 76, 3)  # the recorded original size, not 112 x 80
    assert np.array_equal(rebuilt, _as_saved(outputs['Level_1']))

    # --size overrides the recorded size; it must fit the LR
    status, err = run(capsys, 'up', lr_file, '-o', tmp_path / 'sized', '--size', '70x100', *_net_args(files))
    assert status == 0, err
    assert cv2.imread(str(tmp_path / 'sized' / 'photo.png')).shape == (100, 70, 3)
    status, err = run(capsys, 'up', lr_file, '-o', tmp_path / 'badsize', '--size', '50x50', *_net_args(files))
    assert status == 1 and f'error: {lr_file}: output size 50x50 does not fit an LR of 5x7 at 16x' in err
    assert not os.path.exists(tmp_path / 'badsize' / 'photo.png')
    # the LR remembers its scale
    status, err = run(capsys, 'up', lr_file, '-o', tmp_path / 'x32', '--opt', files['opt32'], '--weights',
                      files['weights32'])
    assert status == 1 and f'error: {lr_file}: this LR was made at 16x, the network rescales by 32x' in err
    assert _no_outputs(tmp_path / 'x32')


def test_mod_crop_and_tiles_from_the_command_line(files, tmp_path, capsys):
    status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'lr', '--mod-crop', '--tile', '64',
                      '--tile-overlap', '16', *_net_args(files))
    assert status == 0, err
    assert cv2.imread(str(tmp_path / 'lr' / 'photo.png')).shape == (6, 4, 3)
    status, err = run(capsys, 'up', tmp_path / 'lr' / 'photo.png', '-o', tmp_path / 'up', '--tile', '48',
                      *_net_args(files))
    assert status == 0, err
    assert cv2.imread(str(tmp_path / 'up' / 'photo.png')).shape == (96, 64, 3)
    status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'bad', '--tile', '100', *_net_args(files))
    assert status == 1 and 'tile=100: must be 0 (never tile) or a positive multiple of ir_scale 16' in err


def test_gray_input_gives_gray_output(files, tmp_path, capsys):
    gray = cv2.cvtColor(cv2.imread(files['photo']), cv2.COLOR_BGR2GRAY)[:64, :48]
    path = tmp_path / 'gray.png'
    cv2.imwrite(str(path), gray)
    assert run(capsys, 'down', path, '-o', tmp_path / 'lr', *_net_args(files))[0] == 0
    assert cv2.imread(str(tmp_path / 'lr' / 'gray.png'), cv2.IMREAD_UNCHANGED).shape == (4, 3, 3)  # LR: colour
    assert run(capsys, 'up', tmp_path / 'lr' / 'gray.png', '-o', tmp_path / 'up', *_net_args(files))[0] == 0
    assert cv2.imread(str(tmp_path / 'up' / 'gray.png'), cv2.IMREAD_UNCHANGED).shape == (64, 48)


def test_rgba_alpha_travels_with_the_lr(files, rescaler, tmp_path, capsys):
    rgb = cv2.imread(files['photo'])[:64, :64]
    ramp = np.tile(np.linspace(0, 255, 64), (64, 1)).round().astype(np.uint8)
    path = tmp_path / 'rgba.png'
    cv2.imwrite(str(path), np.dstack([rgb, ramp]))
    assert run(capsys, 'down', path, '-o', tmp_path / 'lr', *_net_args(files))[0] == 0
    lr = cv2.imread(str(tmp_path / 'lr' / 'rgba.png'), cv2.IMREAD_UNCHANGED)
    assert lr.shape == (4, 4, 4)
    assert run(capsys, 'up', tmp_path / 'lr' / 'rgba.png', '-o', tmp_path / 'up', *_net_args(files))[0] == 0
    out = cv2.imread(str(tmp_path / 'up' / 'rgba.png'), cv2.IMREAD_UNCHANGED)
    assert out.shape == (64, 64, 4)
    # the colour is what the network makes of the RGB alone
    _, outputs = rescaler.roundtrip(_to_tensor(rgb[:, :, ::-1].astype(np.float32) / 255.))
    assert np.array_equal(out[:, :, :3], _as_saved(outputs['Level_1']))
    # bicubic keeps a constant exactly and a linear ramp away from the borders (where MATLAB's
    # symmetric extension folds the ramp over)
    alpha_error = np.abs(out[:, :, 3].astype(float) - ramp)
    print(f'\nalpha ramp after 1/16 and x16 bicubic: mean abs error {alpha_error[:, 24:40].mean():.2f} levels in the '
          f'middle, {alpha_error.mean():.2f} overall')
    assert alpha_error[:, 24:40].max() <= 1 and alpha_error.mean() < 5


def test_16bit_input(files, rescaler, tmp_path, capsys):
    rgb16 = (cv2.imread(files['photo'])[:48, :64].astype(np.uint16) * 257 + 100)
    path = tmp_path / 'deep.png'
    cv2.imwrite(str(path), rgb16)
    assert run(capsys, 'down', path, '-o', tmp_path / 'lr', *_net_args(files))[0] == 0
    lr = cv2.imread(str(tmp_path / 'lr' / 'deep.png'), cv2.IMREAD_UNCHANGED)
    assert lr.dtype == np.uint8  # the LR is always an 8-bit image
    hr = rgb16[:, :, ::-1].astype(np.float32) / 65535.
    assert np.array_equal(lr, _as_saved(rescaler.downscale(_to_tensor(hr))))
    lr_path = tmp_path / 'lr' / 'deep.png'
    assert run(capsys, 'up', lr_path, '-o', tmp_path / 'up16', '--bit-depth', '16', *_net_args(files))[0] == 0
    assert cv2.imread(str(tmp_path / 'up16' / 'deep.png'), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert run(capsys, 'up', lr_path, '-o', tmp_path / 'up8', *_net_args(files))[0] == 0
    assert cv2.imread(str(tmp_path / 'up8' / 'deep.png'), cv2.IMREAD_UNCHANGED).dtype == np.uint8


# ------------------------------------------------------------------------------------------ bad input


def _no_outputs(folder):
    return not os.path.exists(folder) or os.listdir(folder) == []


def test_bad_inputs_fail_clearly_and_leave_nothing(files, tmp_path, capsys):
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    text = tmp_path / 'notes.png'
    text.write_text('not an image')
    no_images = tmp_path / 'no_images'
    no_images.mkdir()
    (no_images / 'readme.txt').write_text('nothing to see')
    bad_opt = _write_yaml(tmp_path / 'typo.yml', {'network_g': dict(TINY, chh=64)})
    missing_key = _write_yaml(tmp_path / 'missing.yml', {'network_g': {k: v for k, v in TINY.items() if k != 'ch'}})
    unknown_top = _write_yaml(tmp_path / 'unknown.yml', {'network_g': TINY, 'netwrk_color': 'rgb'})
    photo = files['photo']
    cases = [
        ([empty, *_net_args(files)], f'error: {empty}: empty file'),
        ([text, *_net_args(files)], f'error: {text}: not an image'),
        ([no_images, *_net_args(files)], f'error: {no_images}: folder contains no images'),
        ([photo, '--opt', files['opt16'], '--weights', files['weights32']],
         f"error: {files['weights32']}: weights of a 32x network, but the network options have ir_scale 16"),
        ([photo, '--scale', '16', '--weights', files['weights32']],
         f"error: {files['weights32']}: weights of a 32x network, but 16x was asked for"),
        ([photo, '--opt', files['opt16'], '--weights', files['weights16_stage1']],
         f"error: {files['weights16_stage1']}: stage-1 weights (no refine.* entries), but the network options are "
         'stage 2'),
        ([photo, '--weights', tmp_path / 'nope.pth'], f"error: {tmp_path / 'nope.pth'}: no such file"),
        ([photo, '--opt', files['opt16']], 'error: --weights is required'),
        ([photo, '--opt', bad_opt, '--weights', files['weights16']],
         f"error: {bad_opt}: network_g: VQIR got an unexpected keyword argument 'chh'"),
        ([photo, '--opt', missing_key, '--weights', files['weights16']],
         f"error: {missing_key}: network_g: VQIR missing 1 required positional argument: 'ch'"),
        ([photo, '--opt', unknown_top, '--weights', files['weights16']],
         f'error: {unknown_top}: unknown option key "netwrk_color"'),
        ([photo, '--half', '--device', 'cpu', *_net_args(files)], 'error: --half needs a CUDA device'),
        ([photo, '--half', '--bf16', *_net_args(files)], 'error: choose one of --half (fp16) and --bf16'),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f'out{i}'
        status, err = run(capsys, 'down', *args, '-o', out)
        assert status != 0, args
        assert message in err, (message, err)
        assert _no_outputs(out), os.listdir(out)


def test_a_folder_with_good_and_bad_files(files, tmp_path, capsys):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    photo = cv2.imread(files['photo'])
    cv2.imwrite(str(folder / 'a.png'), photo)
    cv2.imwrite(str(folder / 'c.jpg'), photo[:40, :50])
    (folder / 'b.png').write_bytes(b'')
    (folder / 'd.png').write_text('text, not pixels')
    png = cv2.imencode('.png', photo)[1].tobytes()
    (folder / 'e.png').write_bytes(png[:len(png) // 3])
    (folder / 'tiny.png').write_bytes(cv2.imencode('.png', photo[:8, :8])[1].tobytes())

    out = tmp_path / 'out'
    status, err = run(capsys, 'down', folder, '-o', out, *_net_args(files))
    assert status == 1
    assert sorted(os.listdir(out)) == ['a.png', 'c.png']  # every good file, nothing else (no temporaries)
    assert cv2.imread(str(out / 'c.png')).shape == (3, 4, 3)
    for name, message in (('b.png', 'empty file'), ('d.png', 'not an image'), ('e.png', 'truncated PNG'),
                          ('tiny.png', 'image is 8x8 pixels; at 16x rescaling both sides must be at least 16')):
        assert f'error: {folder / name}: {message}' in err, (name, err)
    assert err.count('error: ') == 4


# ------------------------------------------------------------------------------------------ from_weights


def test_from_weights_reads_every_layout_and_checks_scale_and_stage(files, tmp_path):
    net = _build(ir_scale=32)
    net.load_state_dict(torch.load(files['weights32'], weights_only=True))
    save_state_dict(net, str(tmp_path / 'w.safetensors'))
    hr = torch.rand(1, 3, 64, 64)
    expected = Rescaler(net.eval(), device='cpu').downscale(hr)
    for path in (files['weights32'], str(tmp_path / 'w.safetensors')):
        loaded = Rescaler.from_weights(path, opt=dict(TINY, ir_scale=32), device='cpu')
        assert loaded.ir_scale == 32 and loaded.stage == 2
        assert torch.equal(loaded.downscale(hr), expected)
    # stage-1 weights with stage-1 options; stage-2 weights also serve a stage-1 network
    stage1 = {k: v for k, v in TINY.items() if k != 'attn_mult'}
    stage1['stage'] = 1
    assert Rescaler.from_weights(files['weights16_stage1'], opt=stage1).stage == 1
    assert Rescaler.from_weights(files['weights16'], opt=stage1).stage == 1
    # a VQGAN checkpoint is not a VQIR network
    vqgan = {k: v for k, v in torch.load(files['weights32'], weights_only=True).items() if not k.startswith('icrm.')}
    torch.save(vqgan, str(tmp_path / 'vqgan.pth'))
    with pytest.raises(CheckpointError, match='a VQGAN checkpoint, not a VQIR network'):
        Rescaler.from_weights(str(tmp_path / 'vqgan.pth'))


def test_outputs_never_overwrite_inputs_or_each_other(files, tmp_path, capsys):
    photo = cv2.imread(files['photo'])
    for folder in ('one', 'two'):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / 'same.png'), photo)
    original = (tmp_path / 'one' / 'same.png').read_bytes()
    status, err = run(capsys, 'down', tmp_path / 'one' / 'same.png', '-o', tmp_path / 'one', *_net_args(files))
    assert status == 1 and 'would overwrite the input' in err
    assert (tmp_path / 'one' / 'same.png').read_bytes() == original
    status, err = run(capsys, 'down', tmp_path / 'one', tmp_path / 'two', '-o', tmp_path / 'out', *_net_args(files))
    assert status == 1 and f"error: {tmp_path / 'two' / 'same.png'}: the output" in err and 'same name' in err
    assert os.listdir(tmp_path / 'out') == ['same.png']


def test_bf16_from_the_command_line(files, tmp_path, capsys):
    status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'lr', *_net_args(files))
    assert status == 0, err
    outs = {}
    for name, flags in (('fp32', []), ('bf16', ['--bf16'])):
        status, err = run(capsys, 'up', tmp_path / 'lr', '-o', tmp_path / name, *flags, *_net_args(files))
        assert status == 0, err
        (out_file, ) = os.listdir(tmp_path / name)
        outs[name] = cv2.imread(str(tmp_path / name / out_file)).astype(int)
    diff = np.abs(outs['bf16'] - outs['fp32'])
    # bfloat16 did run (the images differ) and stays close: measured max 12, mean 1.07 grey levels
    assert outs['bf16'].shape == outs['fp32'].shape
    assert diff.max() > 0 and diff.mean() < 3


# ------------------------------------------------------------------------------------------ command-line habits


def test_up_writes_jpg_and_webp_with_a_suffix(files, rescaler, tmp_path, capsys):
    """Real-ESRGAN's --ext and --suffix: the same reconstruction, in the asked format and name."""
    status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'lr', '--suffix', '_lr', *_net_args(files))
    assert status == 0 and os.listdir(tmp_path / 'lr') == ['photo_lr.png'], err
    lr_file = tmp_path / 'lr' / 'photo_lr.png'
    status, err = run(capsys, 'up', lr_file, '-o', tmp_path / 'png', *_net_args(files))
    assert status == 0, err
    reference = cv2.imread(str(tmp_path / 'png' / 'photo_lr.png'))
    for ext in ('jpg', 'webp'):
        status, err = run(capsys, 'up', lr_file, '-o', tmp_path / ext, '--ext', ext, '--suffix', '_x16',
                          *_net_args(files))
        assert status == 0, err
        assert os.listdir(tmp_path / ext) == [f'photo_lr_x16.{ext}']
        with open(tmp_path / ext / f'photo_lr_x16.{ext}', 'rb') as f:
            head = f.read(12)
        assert head.startswith(b'\xff\xd8\xff') if ext == 'jpg' else head[8:12] == b'WEBP'
        written = cv2.imread(str(tmp_path / ext / f'photo_lr_x16.{ext}'))
        assert written.shape == reference.shape == (100, 76, 3)
        # the PNG's image, encoded by OpenCV with its default quality
        assert np.array_equal(written, cv2.imdecode(cv2.imencode(f'.{ext}', reference)[1], cv2.IMREAD_COLOR))
    status, err = run(capsys, 'up', lr_file, '-o', tmp_path / 'deep', '--ext', 'jpg', '--bit-depth', '16',
                      *_net_args(files))
    assert status == 1 and 'error: --ext jpg stores 8 bits per sample; --bit-depth 16 needs --ext png' in err
    assert not (tmp_path / 'deep').exists()


@pytest.mark.parametrize('fmt, quality', [('jpg', 90), ('webp', 80)])
def test_down_writes_a_jpeg_or_webp_lr_that_up_reads(files, rescaler, tmp_path, capsys, fmt, quality):
    """An LR to share: the network's LR encoded at the asked quality, the original size and scale in
    its EXIF; up rebuilds from exactly those pixels. A JPEG that lost its EXIF needs --size."""
    status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'lr', '--format', fmt, '--quality', quality,
                      *_net_args(files))
    assert status == 0 and os.listdir(tmp_path / 'lr') == [f'photo.{fmt}'], err
    lr_file = tmp_path / 'lr' / f'photo.{fmt}'
    hr, _ = read_image(files['photo'])
    lr, _ = rescaler.roundtrip(_to_tensor(hr))
    flag = cv2.IMWRITE_JPEG_QUALITY if fmt == 'jpg' else cv2.IMWRITE_WEBP_QUALITY
    expected = cv2.imdecode(cv2.imencode(f'.{fmt}', _as_saved(lr), [flag, quality])[1], cv2.IMREAD_COLOR)
    assert np.array_equal(cv2.imread(str(lr_file)), expected)  # OpenCV's encoder, the asked quality
    lr_read, info = read_image(str(lr_file))
    assert info.text == {'vqir:original_size': '76x100', 'vqir:ir_scale': '16', 'vqir:mode': 'rgb'}

    status, err = run(capsys, 'up', lr_file, '-o', tmp_path / 'up', *_net_args(files))
    assert status == 0, err
    rebuilt = cv2.imread(str(tmp_path / 'up' / 'photo.png'))
    assert rebuilt.shape == (100, 76, 3)
    expected_up = rescaler.upscale(_to_tensor(lr_read), out_size=(100, 76))['Level_1']
    assert np.array_equal(rebuilt, _as_saved(expected_up))

    stripped = tmp_path / f'stripped.{fmt}'  # re-encoded elsewhere: pixels only
    cv2.imwrite(str(stripped), cv2.imread(str(lr_file)))
    status, err = run(capsys, 'up', stripped, '-o', tmp_path / 'plain', '--size', '76x100', *_net_args(files))
    assert status == 0 and cv2.imread(str(tmp_path / 'plain' / f'stripped.png')).shape == (100, 76, 3), err


def test_lossy_lr_options_are_checked(files, tmp_path, capsys):
    status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'a', '--quality', '90', *_net_args(files))
    assert status == 1 and 'error: --quality 90: needs --format jpg or webp and a value from 1 to 100' in err
    status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'b', '--format', 'jpg', '--quality', '0',
                      *_net_args(files))
    assert status == 1 and '--quality 0' in err
    rgba = tmp_path / 'logo.png'
    cv2.imwrite(str(rgba), np.dstack([cv2.imread(files['photo']), np.full((100, 76), 128, np.uint8)]))
    status, err = run(capsys, 'down', rgba, '-o', tmp_path / 'c', '--format', 'jpg', *_net_args(files))
    assert status == 1 and f'error: {rgba}: has an alpha channel, which a JPEG LR cannot keep' in err
    assert not (tmp_path / 'c').exists() or os.listdir(tmp_path / 'c') == []


def test_device_index_tile_overlap_spellings_version_and_examples(files, tmp_path, capsys):
    for spelling in ('--tile-overlap', '--tile_overlap'):
        status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / spelling, '--tile', '32', spelling, '16',
                          *_net_args(files))
        assert status == 0, err
    assert (cv2.imread(str(tmp_path / '--tile-overlap' / 'photo.png')) ==
            cv2.imread(str(tmp_path / '--tile_overlap' / 'photo.png'))).all()
    if not torch.cuda.is_available():
        status, err = run(capsys, 'down', files['photo'], '-o', tmp_path / 'gpu', '--device', 'cuda:1',
                          *_net_args(files))
        assert status == 1 and 'error: --device cuda:1: CUDA is not available' in err
    with pytest.raises(SystemExit) as stop:
        main(['down', files['photo'], '-o', str(tmp_path / 'x'), '--device', 'gpu1'])
    assert stop.value.code == 2 and "expected auto, cpu, cuda or cuda:N, got 'gpu1'" in capsys.readouterr().err
    for argv in (['--version'], ['up', '-h']):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
        out = capsys.readouterr().out
        assert ('vqir-rescale (vqir ' in out) if argv == ['--version'] else ('examples:\n  vqir-rescale down' in out)
