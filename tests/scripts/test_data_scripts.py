"""Data-preparation scripts: demo export, sub-image extraction, bicubic LR generation, command-line errors."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from basicsr.utils.matlab_functions import imresize

from vqir.data.hr_image_dataset import HRImageDataset

from helpers import ROOT, load_script
DEMO_TRAIN = {
    'astronaut.png', 'rocket.png', 'hubble_deep_field.png', 'immunohistochemistry.png', 'retina.png',
    'motorcycle_left.png'
}
DEMO_VAL = {'chelsea.png', 'coffee.png', 'motorcycle_right.png', 'colorwheel.png'}
DEMO_SELECT = {'camera.png', 'coins.png', 'moon.png'}


def random_image(height, width, seed, dtype=np.uint8):
    return np.random.RandomState(seed).randint(0, np.iinfo(dtype).max + 1, (height, width, 3)).astype(dtype)


def write(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img)


def folder_bytes(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), 'rb').read()
        for root, _, names in os.walk(folder) for name in names
    }


# -------------------------------------------------------------------------------------------------
# export_demo_data.py


def test_export_demo_data_is_deterministic_and_idempotent(tmp_path, capsys):
    export = load_script('data_preparation/export_demo_data')
    # once through the command line (a fresh process), once in-process
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'data_preparation', 'export_demo_data.py'),
                          '--out', str(tmp_path / 'a')], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count('written') == len(DEMO_TRAIN | DEMO_VAL | DEMO_SELECT)
    assert export.main(['--out', str(tmp_path / 'b')]) == 0

    first, second = folder_bytes(tmp_path / 'a'), folder_bytes(tmp_path / 'b')
    assert set(first) == ({f'train/{n}' for n in DEMO_TRAIN} | {f'val/{n}' for n in DEMO_VAL}
                          | {f'select/{n}' for n in DEMO_SELECT})
    assert first == second  # same bytes

    capsys.readouterr()
    assert export.main(['--out', str(tmp_path / 'b')]) == 0  # again: nothing changes
    assert capsys.readouterr().out.count('unchanged') == len(first)
    assert folder_bytes(tmp_path / 'b') == first

    for name in first:
        img = cv2.imread(str(tmp_path / 'a' / name), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert max(img.shape[:2]) <= (512 if name.startswith('train') else 600) and min(img.shape[:2]) >= 256
    assert cv2.imread(str(tmp_path / 'a' / 'val' / 'chelsea.png')).shape == (300, 451, 3)
    assert cv2.imread(str(tmp_path / 'a' / 'val' / 'coffee.png')).shape == (400, 600, 3)  # held out at full size
    coins = cv2.imread(str(tmp_path / 'a' / 'select' / 'coins.png'))
    assert coins.shape == (303, 384, 3) and (coins == coins[..., :1]).all()  # grey photos as RGB


def test_demo_motorcycle_views_do_not_overlap():
    export = load_script('data_preparation/export_demo_data')
    train_end = export.MOTORCYCLE_TRAIN_COLUMNS[1]
    val_start = export.MOTORCYCLE_VAL_COLUMNS[0]
    # right-view column c shows the left-view column c + disparity, disparity >= 0
    assert val_start >= train_end


# -------------------------------------------------------------------------------------------------
# extract_subimages.py


def test_extract_subimages_windows_and_names(tmp_path, capsys):
    extract = load_script('data_preparation/extract_subimages')
    img = random_image(100, 70, 0)
    deep = random_image(60, 50, 1, dtype=np.uint16)
    write(tmp_path / 'hr' / 'a.png', img)
    write(tmp_path / 'hr' / 'b.png', deep)
    write(tmp_path / 'hr' / 'tiny.png', random_image(20, 20, 2))
    args = ['--input', str(tmp_path / 'hr'), '--crop-size', '48', '--step', '24', '--n-thread', '2']
    assert extract.main(args + ['--output', str(tmp_path / 'sub')]) == 0
    assert 'tiny.png: skipped' in capsys.readouterr().err

    # rows 0, 24, 48 and 52 (flush with the bottom), columns 0 and 22 (flush with the right)
    expected = [(t, l) for t in (0, 24, 48, 52) for l in (0, 22)]
    names = sorted(os.listdir(tmp_path / 'sub'))
    assert names == [f'a_s{i:03d}.png' for i in range(1, 9)] + [f'b_s{i:03d}.png' for i in range(1, 5)]
    for i, (top, left) in enumerate(expected, start=1):
        sub = cv2.imread(str(tmp_path / 'sub' / f'a_s{i:03d}.png'), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(sub, img[top:top + 48, left:left + 48])
    b3 = cv2.imread(str(tmp_path / 'sub' / 'b_s003.png'), cv2.IMREAD_UNCHANGED)
    assert b3.dtype == np.uint16 and np.array_equal(b3, deep[12:60, 0:48])  # bit depth kept

    # a threshold larger than the uncovered border drops the extra row window (4 px) but not the column one
    assert extract.main(args + ['--output', str(tmp_path / 'sub_t'), '--thresh-size', '10', '--n-thread', '1']) == 0
    assert len([n for n in os.listdir(tmp_path / 'sub_t') if n.startswith('a_')]) == 6


def test_extract_subimages_errors(tmp_path, capsys):
    extract = load_script('data_preparation/extract_subimages')
    write(tmp_path / 'hr' / 'a.png', random_image(64, 64, 0))
    write(tmp_path / 'out' / 'old.png', random_image(8, 8, 0))
    with pytest.raises(SystemExit) as exc:
        extract.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'out')])
    assert exc.value.code == 2 and 'output folder is not empty' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        extract.main(['--input', str(tmp_path / 'nothing'), '--output', str(tmp_path / 'o2')])
    assert exc.value.code == 2 and 'image folder does not exist' in capsys.readouterr().err
    (tmp_path / 'hr' / 'broken.png').write_bytes(b'broken')
    code = extract.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'o3'), '--n-thread', '1',
                         '--crop-size', '32', '--step', '32'])
    err = capsys.readouterr().err
    assert code == 1 and f'error: {tmp_path / "hr" / "broken.png"}: not an image' in err
    assert len(os.listdir(tmp_path / 'o3')) == 4  # the good image was still processed


# -------------------------------------------------------------------------------------------------
# generate_bicubic_lr.py


def matlab_lr(img, scale, mod_crop):
    """Expected LR file content: imresize of the padded (or mod-cropped) HR, rounded to the input's dtype."""
    top = np.iinfo(img.dtype).max
    h, w = img.shape[:2]
    if mod_crop:
        hr = img[:h - h % scale, :w - w % scale]
    else:
        hr = np.pad(img, ((0, -h % scale), (0, -w % scale), (0, 0)), mode='reflect')
    lr = imresize(hr.astype(np.float32) / top, 1 / scale)
    return np.clip(np.round(lr * top), 0, top).astype(img.dtype)


def test_generate_bicubic_lr(tmp_path):
    generate = load_script('data_preparation/generate_bicubic_lr')
    img, deep = random_image(40, 50, 3), random_image(32, 32, 4, dtype=np.uint16)
    write(tmp_path / 'hr' / 'a.png', img)
    write(tmp_path / 'hr' / 'sub' / 'b.png', deep)
    assert generate.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'lr'), '--scales', '16', '2',
                          '--n-thread', '2']) == 0
    for scale, shape in ((16, (3, 4, 3)), (2, (20, 25, 3))):
        lr = cv2.imread(str(tmp_path / 'lr' / f'X{scale}' / 'a.png'), cv2.IMREAD_UNCHANGED)
        assert lr.shape == shape and lr.dtype == np.uint8
        assert np.abs(lr.astype(int) - matlab_lr(img, scale, False).astype(int)).max() <= 1  # rounding of float noise
    deep_lr = cv2.imread(str(tmp_path / 'lr' / 'X16' / 'sub' / 'b.png'), cv2.IMREAD_UNCHANGED)
    assert deep_lr.dtype == np.uint16 and deep_lr.shape == (2, 2, 3)
    assert np.abs(deep_lr.astype(int) - matlab_lr(deep, 16, False).astype(int)).max() <= 1

    # the files pair with a dataset reading them, and equal its on-the-fly LR up to 8-bit rounding
    opt = dict(phase='val', dataroot_gt=str(tmp_path / 'hr'), ir_scale=16)
    from_disk = HRImageDataset(dict(opt, dataroot_lq=str(tmp_path / 'lr' / 'X16')))[0]
    on_the_fly = HRImageDataset(opt)[0]
    assert from_disk['lq_path'].endswith(os.path.join('X16', 'a.png'))
    assert (from_disk['lq'] - on_the_fly['lq']).abs().max() <= 0.5 / 255 + 1e-6

    assert generate.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'lr_mod'), '--scales', '16',
                          '--mod-crop', '--n-thread', '1']) == 0
    lr = cv2.imread(str(tmp_path / 'lr_mod' / 'X16' / 'a.png'), cv2.IMREAD_UNCHANGED)
    assert lr.shape == (2, 3, 3)
    assert np.abs(lr.astype(int) - matlab_lr(img, 16, True).astype(int)).max() <= 1


def test_generate_bicubic_lr_errors(tmp_path, capsys):
    generate = load_script('data_preparation/generate_bicubic_lr')
    write(tmp_path / 'hr' / 'a.png', random_image(32, 32, 0))
    for argv, message in (
        (['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'o'), '--scales', '1'], 'integers >= 2'),
        (['--input', str(tmp_path / 'none'), '--output', str(tmp_path / 'o')], 'image folder does not exist'),
        (['--output', str(tmp_path / 'o')], 'required: --input'),
    ):
        with pytest.raises(SystemExit) as exc:
            generate.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    write(tmp_path / 'hr' / 'a.jpg', random_image(32, 32, 1))
    with pytest.raises(SystemExit):
        generate.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'o')])
    assert "share the name 'a'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# create_lmdb.py (its round trip through the datasets is in tests/data/test_datasets.py)


def test_create_lmdb_errors(tmp_path, capsys):
    create = load_script('data_preparation/create_lmdb')
    write(tmp_path / 'hr' / 'a.png', random_image(16, 16, 0))
    for output, message in ((tmp_path / 'x.db', "must end with '.lmdb'"), (tmp_path / 'hr', "must end with '.lmdb'")):
        with pytest.raises(SystemExit) as exc:
            create.main(['--input', str(tmp_path / 'hr'), '--output', str(output)])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / 'exists.lmdb').mkdir()
    with pytest.raises(SystemExit):
        create.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'exists.lmdb')])
    assert 'already exists' in capsys.readouterr().err
    write(tmp_path / 'hr' / 'with space.png', random_image(16, 16, 1))
    with pytest.raises(SystemExit):
        create.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'new.lmdb')])
    assert 'without spaces' in capsys.readouterr().err


@pytest.mark.parametrize('script', ['export_demo_data', 'extract_subimages', 'generate_bicubic_lr', 'create_lmdb'])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as exc:
        load_script(f'data_preparation/{script}').main(['--help'])
    assert exc.value.code == 0 and 'usage:' in capsys.readouterr().out
