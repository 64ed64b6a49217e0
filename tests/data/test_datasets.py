"""HRImageDataset and MultiScaleHRDataset: crops, alignment of gt / lq / levels, file formats, errors."""
import importlib.util
import os
import random

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import DATASET_REGISTRY

from helpers import ROOT, basicsr_log_records

from vqir.data.hr_image_dataset import PIPELINE_KEYS, HRImageDataset
from vqir.data.multiscale_hr_dataset import MultiScaleHRDataset



def random_rgb(height, width, seed, dtype=np.uint8):
    top = np.iinfo(dtype).max
    return np.random.RandomState(seed).randint(0, top + 1, (height, width, 3)).astype(dtype)


def write_rgb(path, rgb):
    """Write an (H, W, 3) RGB or (H, W) gray or (H, W, 4) RGBA array as PNG."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if rgb.ndim == 3 and rgb.shape[2] == 3:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif rgb.ndim == 3 and rgb.shape[2] == 4:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA)
    assert cv2.imwrite(str(path), rgb)


def as_float(rgb):
    """uint8 / uint16 RGB (H, W, 3) -> float32 (3, H, W) tensor in [0, 1]."""
    top = np.float32(np.iinfo(rgb.dtype).max)
    return torch.from_numpy(rgb.astype(np.float32) / top).permute(2, 0, 1).contiguous()


def bicubic(chw, factor):
    return imresize(chw, 1.0 / factor)


def dihedral(x):
    """The 8 flips/rotations of a (C, H, W) tensor (the group basicsr's augment draws from)."""
    out = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(1, 2))
        out += [r, torch.flip(r, dims=(2, ))]
    return out


def find_in(full, patch):
    """All (top, left, k) where dihedral(patch)[k] equals full[:, top:top+h, left:left+w]."""
    hits = []
    for k, cand in enumerate(dihedral(patch)):
        h, w = cand.shape[1:]
        corner_matches = (full[:, :full.shape[1] - h + 1, :full.shape[2] - w + 1] == cand[:, :1, :1]).all(0)
        for top, left in corner_matches.nonzero().tolist():
            if torch.equal(full[:, top:top + h, left:left + w], cand):
                hits.append((top, left, k))
    return hits


def make_dataset(cls=HRImageDataset, **opt):
    return cls(opt)


# -------------------------------------------------------------------------------------------------
# registry and options


def test_registered_names():
    assert DATASET_REGISTRY.get('HRImageDataset') is HRImageDataset
    assert DATASET_REGISTRY.get('MultiScaleHRDataset') is MultiScaleHRDataset


def test_unknown_option_key_is_named(tmp_path):
    write_rgb(tmp_path / 'hr' / 'a.png', random_rgb(32, 32, 0))
    with pytest.raises(ValueError, match=r"'use_flip' \(did you mean 'use_hflip'\?\)"):
        make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), gt_size=16, use_flip=True)
    with pytest.raises(ValueError, match="'random_downscale'"):  # a MultiScaleHRDataset-only key
        make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), random_downscale=False)
    # the keys basicsr's pipeline adds are accepted
    standard = {key: None for key in PIPELINE_KEYS}
    standard.update(phase='val', name='x', type='HRImageDataset', scale=16)
    assert len(make_dataset(dataroot_gt=str(tmp_path / 'hr'), **standard)) == 1


@pytest.mark.parametrize('opt, message', [
    (dict(phase='train', gt_size=40, ir_scale=16), "'gt_size' must be a positive multiple of 16"),
    (dict(phase='train', ir_scale=16), "'gt_size'"),
    (dict(phase='val', ir_scale=8), "'ir_scale' must be one of"),
    (dict(phase='val', color='bgr'), "'color' must be 'rgb'"),
    (dict(phase='val', mod_crop=True), "'mod_crop' needs 'ir_scale'"),
    (dict(phase='val', dataroot_lq='somewhere'), "'dataroot_lq' needs 'ir_scale'"),
    (dict(phase='val', io_backend={'type': 'memcached'}), "io_backend type must be 'disk' or 'lmdb'"),
    (dict(), "'phase' is required"),
])
def test_bad_options(tmp_path, opt, message):
    write_rgb(tmp_path / 'hr' / 'a.png', random_rgb(32, 32, 0))
    with pytest.raises(ValueError, match=message):
        make_dataset(dataroot_gt=str(tmp_path / 'hr'), **opt)


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match=f'no image files .* found in folder: {tmp_path / "empty"}'):
        make_dataset(phase='val', dataroot_gt=str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='missing'):
        make_dataset(phase='val', dataroot_gt=str(tmp_path / 'missing'))


def test_corrupt_file_is_named(tmp_path):
    write_rgb(tmp_path / 'hr' / 'a_good.png', random_rgb(32, 32, 0))
    (tmp_path / 'hr' / 'b_garbage.png').write_bytes(b'this is not a png')
    ok, png = cv2.imencode('.png', random_rgb(32, 32, 1))
    (tmp_path / 'hr' / 'c_truncated.png').write_bytes(png.tobytes()[:200])
    ds = make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), ir_scale=16)
    assert ds[0]['gt'].shape == (3, 32, 32)
    for index, name in ((1, 'b_garbage.png'), (2, 'c_truncated.png')):
        with pytest.raises(ValueError, match=f'{name}: '):  # the path first, then what is wrong
            ds[index]


# -------------------------------------------------------------------------------------------------
# HRImageDataset geometry


def test_train_crop_augment_and_on_the_fly_lq(tmp_path):
    src = random_rgb(80, 72, 0)
    write_rgb(tmp_path / 'hr' / 'a.png', src)
    ds = make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), gt_size=32, ir_scale=16)
    random.seed(0)
    transforms_seen = set()
    for _ in range(12):
        item = ds[0]
        assert set(item) == {'gt', 'lq', 'gt_path', 'lq_path'}
        assert item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 2, 2)
        assert item['gt'].dtype == torch.float32 and item['lq'].dtype == torch.float32
        assert item['lq_path'] == item['gt_path'] == str(tmp_path / 'hr' / 'a.png')
        # gt is a flipped / rotated window of the source (RGB, /255), lq its exact bicubic
        hits = find_in(as_float(src), item['gt'])
        assert len(hits) == 1
        transforms_seen.add(hits[0][2])
        torch.testing.assert_close(item['lq'], bicubic(item['gt'], 16), rtol=0, atol=1e-6)
    assert len(transforms_seen) > 2  # flips and rotations were drawn


def test_train_crop_reads_matching_lr_from_disk(tmp_path):
    # independent random HR and LR content: only a correctly aligned crop matches both
    hr, lr = random_rgb(96, 80, 1), random_rgb(6, 5, 2)
    write_rgb(tmp_path / 'hr' / 'img.png', hr)
    write_rgb(tmp_path / 'lr' / 'img.png', lr)
    ds = make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), dataroot_lq=str(tmp_path / 'lr'),
                      gt_size=32, ir_scale=16)
    random.seed(1)
    positions = set()
    for _ in range(12):
        item = ds[0]
        assert item['lq_path'] == str(tmp_path / 'lr' / 'img.png')
        assert item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 2, 2)
        gt_hits = find_in(as_float(hr), item['gt'])
        assert len(gt_hits) == 1
        top, left, k = gt_hits[0]
        assert top % 16 == 0 and left % 16 == 0
        lr_window = as_float(lr)[:, top // 16:top // 16 + 2, left // 16:left // 16 + 2]
        assert torch.equal(dihedral(item['lq'])[k], lr_window)  # the same flip / rotation as gt
        positions.add((top, left))
    assert len(positions) > 1


def test_lr_file_of_wrong_size_and_missing_lr(tmp_path):
    write_rgb(tmp_path / 'hr' / 'a.png', random_rgb(64, 64, 0))
    write_rgb(tmp_path / 'lr' / 'a.png', random_rgb(5, 4, 1))
    ds = make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), dataroot_lq=str(tmp_path / 'lr'),
                      gt_size=32, ir_scale=16)
    with pytest.raises(ValueError, match=r'LR image .*a\.png is 5x4.*HR image .*is 64x64.*4x4'):
        ds[0]
    write_rgb(tmp_path / 'hr' / 'b.png', random_rgb(64, 64, 2))
    with pytest.raises(FileNotFoundError, match=r"no LR image named 'b'"):
        make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), dataroot_lq=str(tmp_path / 'lr'), ir_scale=16)


def test_small_image_is_reflect_padded_and_logged_once(tmp_path):
    src = random_rgb(20, 24, 3)
    write_rgb(tmp_path / 'hr' / 'small.png', src)
    with basicsr_log_records() as records:
        ds = make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), gt_size=32, ir_scale=16,
                          use_hflip=False, use_rot=False)
        items = [ds[0] for _ in range(3)]
    expected = F.pad(as_float(src)[None], (0, 8, 0, 12), mode='reflect')[0]
    for item in items:
        assert item['gt'].shape == (3, 32, 32)
        assert torch.equal(item['gt'], expected)
        assert item['lq'].shape == (3, 2, 2)
    assert sum('reflect-padded' in r.getMessage() for r in records) == 1

    # with an LR file too (ceil or floor size): both are padded, the LR's pixels stay in place
    for lr_size in (2, 1):
        lr = random_rgb(lr_size, lr_size, 4)
        write_rgb(tmp_path / f'lr{lr_size}' / 'small.png', lr)
        ds = make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), dataroot_lq=str(tmp_path / f'lr{lr_size}'),
                          gt_size=32, ir_scale=16, use_hflip=False, use_rot=False)
        item = ds[0]
        assert item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 2, 2)
        assert torch.equal(item['lq'][:, :lr_size, :lr_size], as_float(lr))
        assert torch.equal(item['gt'][:, :16, :16], as_float(src[:16, :16]))


def test_val_keeps_size_and_pads_for_lq(tmp_path):
    src = random_rgb(40, 50, 5)
    write_rgb(tmp_path / 'hr' / 'odd.png', src)
    item = make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), ir_scale=16)[0]
    assert torch.equal(item['gt'], as_float(src))  # original size, no crop
    assert item['lq'].shape == (3, 3, 4)  # ceil(40/16) x ceil(50/16)
    padded = F.pad(item['gt'][None], (0, 14, 0, 8), mode='reflect')[0]  # how the model pads
    torch.testing.assert_close(item['lq'], bicubic(padded, 16), rtol=0, atol=1e-6)


def test_val_mod_crop(tmp_path):
    src = random_rgb(40, 50, 6)
    write_rgb(tmp_path / 'hr' / 'odd.png', src)
    item = make_dataset(phase='test', dataroot_gt=str(tmp_path / 'hr'), ir_scale=16, mod_crop=True)[0]
    assert torch.equal(item['gt'], as_float(src[:32, :48]))
    torch.testing.assert_close(item['lq'], bicubic(item['gt'], 16), rtol=0, atol=1e-6)


def test_val_reads_lr_files(tmp_path):
    write_rgb(tmp_path / 'hr' / 'odd.png', random_rgb(40, 50, 7))
    ceil_lr, floor_lr = random_rgb(3, 4, 8), random_rgb(2, 3, 9)
    write_rgb(tmp_path / 'lr_ceil' / 'odd.png', ceil_lr)
    write_rgb(tmp_path / 'lr_floor' / 'odd.png', floor_lr)
    opt = dict(phase='val', dataroot_gt=str(tmp_path / 'hr'), ir_scale=16)
    item = make_dataset(dataroot_lq=str(tmp_path / 'lr_ceil'), **opt)[0]
    assert torch.equal(item['lq'], as_float(ceil_lr)) and item['gt'].shape == (3, 40, 50)
    with pytest.raises(ValueError, match='need mod_crop: true'):
        make_dataset(dataroot_lq=str(tmp_path / 'lr_floor'), **opt)[0]
    item = make_dataset(dataroot_lq=str(tmp_path / 'lr_floor'), mod_crop=True, **opt)[0]
    assert torch.equal(item['lq'], as_float(floor_lr)) and item['gt'].shape == (3, 32, 48)


def test_meta_info_file_selects_images(tmp_path):
    for i in range(3):
        write_rgb(tmp_path / 'hr' / f'{i}.png', random_rgb(16, 16, i))
    meta = tmp_path / 'meta.txt'
    meta.write_text('2.png (16,16,3) 1\n0.png (16,16,3) 1\n')
    ds = make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), meta_info_file=str(meta))
    assert [os.path.basename(ds[i]['gt_path']) for i in range(len(ds))] == ['2.png', '0.png']


# -------------------------------------------------------------------------------------------------
# file formats


def test_16bit_gray_and_rgba_files(tmp_path):
    rng = np.random.RandomState(10)
    deep = rng.randint(0, 65536, (16, 16, 3)).astype(np.uint16)
    dark_deep = rng.randint(0, 256, (16, 16, 3)).astype(np.uint16)  # 16 bit with only small values
    gray = rng.randint(0, 256, (16, 16)).astype(np.uint8)
    rgba = rng.randint(0, 256, (16, 16, 4)).astype(np.uint8)
    for name, img in (('a_deep', deep), ('b_dark_deep', dark_deep), ('c_gray', gray), ('d_rgba', rgba)):
        write_rgb(tmp_path / 'hr' / f'{name}.png', img)
    ds = make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'))
    items = [ds[i] for i in range(4)]
    torch.testing.assert_close(items[0]['gt'], torch.from_numpy(deep / 65535.0).permute(2, 0, 1).float())
    torch.testing.assert_close(items[1]['gt'], torch.from_numpy(dark_deep / 65535.0).permute(2, 0, 1).float())
    assert items[1]['gt'].max() < 256 / 65535 + 1e-6  # scaled by dtype, not by the values
    assert torch.equal(items[2]['gt'], as_float(np.repeat(gray[:, :, None], 3, axis=2)))
    assert torch.equal(items[3]['gt'], as_float(rgba[:, :, :3]))
    for item in items:
        assert item['gt'].shape == (3, 16, 16) and item['gt'].dtype == torch.float32


# -------------------------------------------------------------------------------------------------
# lmdb backend


def load_script(name):
    spec = importlib.util.spec_from_file_location(f'vqir_script_{name}', os.path.join(ROOT, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lmdb_round_trip(tmp_path):
    create_lmdb = load_script('data_preparation/create_lmdb')
    hr = {'x': random_rgb(40, 50, 11), 'y': random_rgb(48, 48, 12, dtype=np.uint16)}
    lr = {'x': random_rgb(3, 4, 13), 'y': random_rgb(3, 3, 14)}
    for name in hr:
        write_rgb(tmp_path / 'hr' / f'{name}.png', hr[name])
        write_rgb(tmp_path / 'lr' / f'{name}.png', lr[name])
    for folder in ('hr', 'lr'):
        assert create_lmdb.main(['--input', str(tmp_path / folder), '--output', str(tmp_path / f'{folder}.lmdb')]) == 0
    meta_lines = (tmp_path / 'hr.lmdb' / 'meta_info.txt').read_text().splitlines()
    assert meta_lines == ['x.png (40,50,3) 1', 'y.png (48,48,3) 1']

    ds = make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr.lmdb'), dataroot_lq=str(tmp_path / 'lr.lmdb'),
                      io_backend={'type': 'lmdb'}, ir_scale=16)
    assert len(ds) == 2
    for index, name in enumerate(('x', 'y')):
        item = ds[index]
        assert item['gt_path'] == name and item['lq_path'] == name
        assert torch.equal(item['gt'], as_float(hr[name]))
        assert torch.equal(item['lq'], as_float(lr[name]))

    ds = make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr.lmdb'), io_backend={'type': 'lmdb'},
                      gt_size=32, ir_scale=16, cls=MultiScaleHRDataset)
    item = ds[1]
    assert item['gt'].shape == (3, 32, 32) and item['gt_level4'].shape == (3, 8, 8)

    with pytest.raises(ValueError, match="needs a '.lmdb' folder"):
        make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), io_backend={'type': 'lmdb'})


def test_one_reader_for_datasets_lmdb_rescale_and_scripts(tmp_path):
    """A phone JPEG stored on its side with an EXIF orientation tag, a grey PNG and a 16-bit PNG
    come out the same from vqir-rescale's reader, a disk dataset, an LMDB made by create_lmdb and
    the LR that generate_bicubic_lr writes: upright, and pixel for pixel identical."""
    from PIL import Image
    from vqir.utils.image_io import read_image
    stored = random_rgb(32, 48, 21)  # as the sensor wrote it: 48 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned clockwise: 32 wide, 48 high
    os.makedirs(tmp_path / 'hr')
    Image.fromarray(stored).save(tmp_path / 'hr' / 'phone.jpg', quality=95, exif=exif.tobytes())
    write_rgb(tmp_path / 'hr' / 'grey.png', random_rgb(48, 32, 22)[:, :, 0])
    write_rgb(tmp_path / 'hr' / 'deep.png', random_rgb(48, 32, 23, dtype=np.uint16))

    expected = {name: torch.from_numpy(read_image(str(tmp_path / 'hr' / f'{name}.{ext}'))[0]).permute(2, 0, 1)
                for name, ext in (('phone', 'jpg'), ('grey', 'png'), ('deep', 'png'))}
    assert expected['phone'].shape == (3, 48, 32)  # upright
    assert load_script('data_preparation/create_lmdb').main(
        ['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'hr.lmdb')]) == 0
    assert (tmp_path / 'hr.lmdb' / 'meta_info.txt').read_text().splitlines() == [
        'deep.png (48,32,3) 1', 'grey.png (48,32,1) 1', 'phone.png (48,32,3) 1']
    disk = make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), ir_scale=16)
    packed = make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr.lmdb'), io_backend={'type': 'lmdb'}, ir_scale=16)
    for dataset in (disk, packed):
        items = {os.path.splitext(os.path.basename(item['gt_path']))[0]: item for item in dataset}
        for name, img in expected.items():
            assert torch.equal(items[name]['gt'], img), name

    assert load_script('data_preparation/generate_bicubic_lr').main(
        ['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'lr'), '--scales', '16', '--n-thread', '1']) == 0
    lr, _ = read_image(str(tmp_path / 'lr' / 'X16' / 'phone.png'))
    torch.testing.assert_close(torch.from_numpy(lr).permute(2, 0, 1), disk[2]['lq'], atol=0.5 / 255, rtol=0)


# -------------------------------------------------------------------------------------------------
# MultiScaleHRDataset


def test_multiscale_train_levels_match_gt(tmp_path):
    write_rgb(tmp_path / 'hr' / 'a.png', random_rgb(100, 90, 15))
    ds = make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), gt_size=64, ir_scale=16,
                      cls=MultiScaleHRDataset)
    assert ds.downscale_factors == (1.0, 0.5)  # the reference's augmentation, on by default in train
    random.seed(2)
    for _ in range(4):
        item = ds[0]
        assert set(item) == {'gt', 'gt_level2', 'gt_level4', 'lq', 'gt_path', 'lq_path'}
        assert item['gt'].shape == (3, 64, 64)
        assert item['gt_level2'].shape == (3, 32, 32) and item['gt_level4'].shape == (3, 16, 16)
        assert item['lq'].shape == (3, 4, 4)
        for key, factor in (('gt_level2', 2), ('gt_level4', 4), ('lq', 16)):
            torch.testing.assert_close(item[key], bicubic(item['gt'], factor), rtol=0, atol=1e-6)


def test_multiscale_random_downscale(tmp_path):
    src = random_rgb(100, 90, 16)
    write_rgb(tmp_path / 'hr' / 'a.png', src)
    opt = dict(phase='train', dataroot_gt=str(tmp_path / 'hr'), gt_size=32, use_hflip=False, use_rot=False,
               cls=MultiScaleHRDataset)
    half = cv2.resize(src.astype(np.float32) / 255, (45, 50), interpolation=cv2.INTER_LINEAR)
    random.seed(3)
    item = make_dataset(random_downscale=[0.5], **opt)[0]
    assert len(find_in(torch.from_numpy(half).permute(2, 0, 1), item['gt'])) == 1
    item = make_dataset(random_downscale=False, **opt)[0]
    assert len(find_in(as_float(src), item['gt'])) == 1

    # never enlarged below the crop size: a 40x36 image at factor 0.5 becomes 32x32, not 20x18
    write_rgb(tmp_path / 'small' / 'b.png', random_rgb(40, 36, 17))
    opt['dataroot_gt'] = str(tmp_path / 'small')
    assert make_dataset(random_downscale=[0.5], **opt)[0]['gt'].shape == (3, 32, 32)

    with pytest.raises(ValueError, match='train augmentation'):
        make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), random_downscale=True, cls=MultiScaleHRDataset)
    write_rgb(tmp_path / 'lr' / 'a.png', random_rgb(7, 6, 18))
    with pytest.raises(ValueError, match="cannot be combined with 'dataroot_lq'"):
        make_dataset(dataroot_lq=str(tmp_path / 'lr'), ir_scale=16, **{**opt, 'dataroot_gt': str(tmp_path / 'hr')})
    with pytest.raises(ValueError, match='list of factors'):
        make_dataset(random_downscale=[2.0], **opt)
    with pytest.raises(ValueError, match='multiple of 4'):
        make_dataset(**{**opt, 'gt_size': 30})


def test_multiscale_val_shapes(tmp_path):
    src = random_rgb(40, 50, 19)
    write_rgb(tmp_path / 'hr' / 'odd.png', src)
    ds = make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), ir_scale=16, cls=MultiScaleHRDataset)
    assert ds.downscale_factors is None
    item = ds[0]
    assert torch.equal(item['gt'], as_float(src))
    assert item['gt_level2'].shape == (3, 20, 25) and item['gt_level4'].shape == (3, 10, 13)
    assert item['lq'].shape == (3, 3, 4)
    torch.testing.assert_close(item['gt_level4'], bicubic(item['gt'], 4), rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# colour augmentation and generated images


def test_color_matrix_keeps_luma_under_hue_rotation_and_scales_chroma():
    from vqir.data.color_augment import ColorAugment
    rng = np.random.RandomState(0)
    rgb = rng.uniform(0.2, 0.8, (64, 3))
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    hue = ColorAugment(hue=True)
    angles_differ = set()
    for _ in range(5):
        m = hue.random_matrix(rng)
        out = rgb @ m.T
        np.testing.assert_allclose(out @ np.array([0.299, 0.587, 0.114]), luma, atol=1e-9)  # brightness kept
        assert np.allclose(m @ np.ones(3), np.ones(3))  # greys stay grey
        angles_differ.add(round(float(m[0, 0]), 6))
    assert len(angles_differ) == 5
    grey = ColorAugment(saturation=[0.0, 0.0]).random_matrix(rng)
    np.testing.assert_allclose(rgb @ grey.T, np.repeat(luma[:, None], 3, axis=1), atol=1e-9)
    gain = ColorAugment(exposure=[1.0, 1.0]).random_matrix(rng)
    np.testing.assert_allclose(gain, 2 * np.eye(3), atol=1e-12)
    perms = {tuple(np.argmax(ColorAugment(channel_shuffle=True).random_matrix(rng), axis=1)) for _ in range(40)}
    assert len(perms) == 6
    assert np.array_equal(ColorAugment(hue=True, prob=0.0).random_matrix(rng), np.eye(3))


def test_color_matrix_applies_in_rgb_to_bgr_images():
    from vqir.data.color_augment import ColorAugment
    img_bgr = np.random.RandomState(1).uniform(0, 1, (4, 5, 3)).astype(np.float32)
    swap_red_green = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)  # acts on RGB vectors
    out = ColorAugment.apply(img_bgr, swap_red_green)
    np.testing.assert_array_equal(out[..., 2], img_bgr[..., 1])  # R' = G
    np.testing.assert_array_equal(out[..., 1], img_bgr[..., 2])  # G' = R
    np.testing.assert_array_equal(out[..., 0], img_bgr[..., 0])
    assert ColorAugment.apply(img_bgr, 3 * np.eye(3)).max() == 1.0  # clipped


def test_dead_leaves_images_cover_colours_and_edges():
    from vqir.data.dead_leaves import dead_leaves
    img = dead_leaves(64, np.random.RandomState(0))
    assert img.shape == (64, 64, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert len(np.unique(np.round(img.reshape(-1, 3), 2), axis=0)) > 50
    chroma = img - img.mean(axis=2, keepdims=True)
    assert np.abs(chroma).mean() > 0.05  # coloured, not grey
    assert not np.array_equal(img, dead_leaves(64, np.random.RandomState(1)))
    np.testing.assert_array_equal(img, dead_leaves(64, np.random.RandomState(0)))


def test_dataset_colour_augment_keeps_lq_the_bicubic_of_gt(tmp_path):
    write_rgb(tmp_path / 'hr' / 'a.png', random_rgb(64, 64, 2))
    ds = make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), gt_size=32, ir_scale=16,
                      color_augment=dict(hue=True, saturation=[0.5, 1.5], exposure=[-0.5, 0.5],
                                         channel_shuffle=True), dead_leaves_prob=0.5)
    np.random.seed(0)
    random.seed(0)
    paths = []
    for _ in range(12):
        item = ds[0]
        assert item['gt'].shape == (3, 32, 32) and 0 <= item['gt'].min() and item['gt'].max() <= 1
        torch.testing.assert_close(item['lq'], bicubic(item['gt'], 16), rtol=0, atol=1e-6)
        paths.append(item['gt_path'])
    assert 'dead_leaves' in paths and str(tmp_path / 'hr' / 'a.png') in paths


@pytest.mark.parametrize('opt, message', [
    (dict(color_augment=dict(hue=1)), "'hue' must be true or false"),
    (dict(color_augment=dict(saturation=[1.5, 0.5])), "'saturation' must be [low, high]"),
    (dict(color_augment=dict(tint=True)), "unknown color_augment key(s) 'tint'"),
    (dict(color_augment='yes'), "'color_augment' must be a dict"),
    (dict(dead_leaves_prob=2), "'dead_leaves_prob' must be a number in [0, 1]"),
])
def test_bad_augmentation_options(tmp_path, opt, message):
    write_rgb(tmp_path / 'hr' / 'a.png', random_rgb(32, 32, 0))
    with pytest.raises(ValueError) as err:
        make_dataset(phase='train', dataroot_gt=str(tmp_path / 'hr'), gt_size=32, **opt)
    assert message in str(err.value)
    with pytest.raises(ValueError, match='train augmentations'):
        make_dataset(phase='val', dataroot_gt=str(tmp_path / 'hr'), dead_leaves_prob=0.5)
