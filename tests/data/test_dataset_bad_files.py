"""HRImageDataset on broken and unusual image files: truncated, empty, text, a decompression bomb and
a corrupt PNG are each one error naming the file (the message vqir-rescale gives too, see
tests/cli/test_rescale_bad_inputs.py); grey+alpha and 16-bit files are read; an image with a side of
one scale unit gets its LR."""
from os import path as osp

import cv2
import numpy as np
import pytest
import torch

from vqir.data.hr_image_dataset import HRImageDataset
from vqir.utils.image_io import ImageReadError

from helpers import BROKEN_CASES, BROKEN_IMAGES, PHOTO, gray_alpha_png


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
    (tmp_path / 'la.png').write_bytes(gray_alpha_png())
    rgb16 = PHOTO.astype(np.uint16) * 257 + 3  # values no 8-bit image has
    cv2.imwrite(str(tmp_path / 'rgb16.png'), rgb16)
    items = {osp.basename(item['gt_path']): item for item in _dataset(tmp_path, 'val')}
    gray = torch.from_numpy(PHOTO[:, :, 1].astype(np.float32) / 255.)
    for c in range(3):  # grey repeated, alpha dropped
        torch.testing.assert_close(items['la.png']['gt'][c], gray)
    expected16 = torch.from_numpy(rgb16[:, :, ::-1].astype(np.float32) / 65535.).permute(2, 0, 1)
    torch.testing.assert_close(items['rgb16.png']['gt'], expected16)
    assert items['la.png']['lq'].shape == items['rgb16.png']['lq'].shape == (3, 3, 3)


# ---------------------------------------------------------------------------------------------- one scale unit
# basicsr's MATLAB imresize fails (RuntimeError: "The size of tensor a (24) must match the size of tensor b (16)")
# when a side of its input is shorter than its kernel's reach (a side of one scale unit, 16 pixels at 1/16, for
# one). Every image with a side of 1 to 16 pixels reaches it that way once padded to a multiple of the scale.


def test_dataset_lq_of_an_image_with_a_16_pixel_side(tmp_path):
    cv2.imwrite(str(tmp_path / 'strip.png'), np.full((16, 48, 3), 90, np.uint8))
    item = _dataset(tmp_path, 'val')[0]
    assert item['gt'].shape == (3, 16, 48) and item['lq'].shape == (3, 1, 3)
    torch.testing.assert_close(item['lq'], torch.full((3, 1, 3), 90 / 255.))  # a flat image stays flat
