"""read_image / write_image / list_images: modes, bit depths, text chunks, and every bad file."""
import glob
import os
import struct
import tempfile
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from vqir.utils.image_io import ImageReadError, ImageWriteError, list_images, read_image, write_image


@pytest.fixture
def rgb_u8():
    return skdata.astronaut()[:48, :40].copy()  # (48, 40, 3) uint8 RGB


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.endswith('.tmp')]


def test_rgb_8bit_round_trip(tmp_path, rgb_u8):
    path = str(tmp_path / 'a.png')
    cv2.imwrite(path, rgb_u8[:, :, ::-1])
    img, info = read_image(path)
    assert img.dtype == np.float32 and img.shape == (48, 40, 3)
    assert np.array_equal(img, rgb_u8.astype(np.float32) / 255.)  # RGB order, exact k/255
    assert (info.mode, info.bit_depth, info.size, info.alpha) == ('rgb', 8, (48, 40), None)
    out = str(tmp_path / 'b.png')
    write_image(out, img)
    assert np.array_equal(cv2.imread(out, cv2.IMREAD_UNCHANGED), rgb_u8[:, :, ::-1])
    assert _leftovers(tmp_path) == []


def test_gray_stays_gray(tmp_path, rgb_u8):
    gray = cv2.cvtColor(rgb_u8, cv2.COLOR_RGB2GRAY)
    path = str(tmp_path / 'g.png')
    cv2.imwrite(path, gray)
    img, info = read_image(path)
    assert info.mode == 'gray' and img.shape == (48, 40, 3)
    assert np.array_equal(img[:, :, 0], img[:, :, 2])
    out = str(tmp_path / 'g_out.png')
    write_image(out, img, info=info)
    back = cv2.imread(out, cv2.IMREAD_UNCHANGED)
    assert back.ndim == 2 and np.array_equal(back, gray)


def test_rgba_keeps_alpha(tmp_path):
    logo = skdata.logo()[:64, :80]  # RGBA uint8
    path = str(tmp_path / 'logo.png')
    cv2.imwrite(path, cv2.cvtColor(logo, cv2.COLOR_RGBA2BGRA))
    img, info = read_image(path)
    assert info.mode == 'rgba' and img.shape == (64, 80, 3)
    assert info.alpha.dtype == np.float32 and np.array_equal(info.alpha, logo[:, :, 3] / np.float32(255.))
    out = str(tmp_path / 'logo_out.png')
    write_image(out, img, info=info)
    assert np.array_equal(cv2.cvtColor(cv2.imread(out, cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA), logo)
    with pytest.raises(ImageWriteError, match='cannot store an alpha channel'):
        write_image(str(tmp_path / 'logo.jpg'), img, info=info)
    with pytest.raises(ImageWriteError, match='alpha is 40x32 but the image is 80x64'):
        write_image(out, img, alpha=np.zeros((32, 40), np.float32))


def test_16bit_detected_by_dtype(tmp_path):
    rng = np.random.default_rng(0)
    # values that fit in 8 bits: a value-based guess would call this 8-bit
    img16 = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint16)
    path = str(tmp_path / 'deep.png')
    cv2.imwrite(path, img16)
    img, info = read_image(path)
    assert info.bit_depth == 16
    assert np.array_equal(img, img16[:, :, ::-1].astype(np.float32) / 65535.)
    out = str(tmp_path / 'deep_out.png')
    write_image(out, img, bit_depth=16)
    back = cv2.imread(out, cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, img16)
    with pytest.raises(ImageWriteError, match='cannot store 16 bits'):
        write_image(str(tmp_path / 'deep.jpg'), img, bit_depth=16)
    assert not os.path.exists(tmp_path / 'deep.jpg')


def test_png_text_chunks(tmp_path, rgb_u8):
    path = str(tmp_path / 't.png')
    write_image(path, rgb_u8 / 255., text={'vqir:original_size': '100x76', 'note': 'ünïcode'})
    img, info = read_image(path)
    assert info.text == {'vqir:original_size': '100x76', 'note': 'ünïcode'}
    assert np.array_equal(cv2.imread(path)[:, :, ::-1], rgb_u8)  # still an ordinary PNG


def test_write_clamps_and_accepts_tensors(tmp_path):
    import torch
    path = str(tmp_path / 'c.png')
    write_image(path, torch.tensor([[[[-0.5]], [[0.5]], [[1.5]]]]))  # (1, 3, 1, 1) RGB
    assert cv2.imread(path)[0, 0].tolist() == [255, 128, 0]  # BGR on disk


def _bad(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _png_header_only(width, height):
    """A PNG signature and an IHDR claiming ``width x height`` (no pixel data)."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack('>I', len(ihdr)) + b'IHDR' + ihdr + struct.pack('>I', zlib.crc32(b'IHDR' + ihdr))
    return b'\x89PNG\r\n\x1a\n' + chunk


def test_bad_files_give_one_clear_error(tmp_path, rgb_u8):
    png = cv2.imencode('.png', rgb_u8)[1].tobytes()
    jpg = cv2.imencode('.jpg', rgb_u8)[1].tobytes()
    cases = [
        (str(tmp_path / 'missing.png'), 'no such file'),
        (str(tmp_path), 'not a file'),
        (_bad(tmp_path, 'empty.png', b''), 'empty file'),
        (_bad(tmp_path, 'text.png', b'this is not an image\n'), 'not an image'),
        (_bad(tmp_path, 'cut.png', png[:len(png) // 2]), 'truncated PNG'),
        (_bad(tmp_path, 'cut.jpg', jpg[:len(jpg) // 2]), 'JPEG data cannot be decoded'),
        (_bad(tmp_path, 'bomb.png', _png_header_only(100000, 100000) + png[33:]), 'decompression bomb'),
        # floating-point formats are refused before decoding (OpenCV would leave a temporary file)
        (_bad(tmp_path, 'bomb.hdr', b'#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 100000 +X 100000\n' + bytes(64)),
         'Radiance HDR images are not read'),
    ]
    leftovers = set(glob.glob(os.path.join(tempfile.gettempdir(), '__opencv_temp.*')))
    for path, message in cases:
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        text = str(err.value)
        assert text.startswith(path + ': ') and message in text and '\n' not in text, text
    # nothing left behind by the decoder (OpenCV's temporary files of formats it cannot decode in memory)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), '__opencv_temp.*'))) <= leftovers


def test_png_with_bytes_after_its_end_chunk_is_read(tmp_path, rgb_u8):
    """Data appended after IEND (some tools add it) is ignored, as decoders do; a PNG cut before
    its IEND chunk is still refused."""
    png = cv2.imencode('.png', rgb_u8)[1].tobytes()
    img, _ = read_image(_bad(tmp_path, 'trailing.png', png + bytes(100)))
    np.testing.assert_array_equal(np.round(img * 255).astype(np.uint8), rgb_u8[:, :, ::-1])
    with pytest.raises(ImageReadError, match='truncated PNG'):
        read_image(_bad(tmp_path, 'cut.png', png[:-4]))


def test_pixel_limit_and_sample_type(tmp_path, rgb_u8):
    path = str(tmp_path / 'a.png')
    cv2.imwrite(path, rgb_u8)
    with pytest.raises(ImageReadError, match=r'40x48 = 1,920 pixels, more than the limit of 1,000'):
        read_image(path, max_pixels=1000)
    tif = str(tmp_path / 'float.tif')
    cv2.imwrite(tif, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ImageReadError, match='unsupported sample type float32'):
        read_image(tif)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ImageWriteError, match='expected an \\(H, W, 3\\) RGB image'):
        write_image(str(tmp_path / 'x.png'), np.zeros((4, 4)))
    with pytest.raises(ImageWriteError, match='cannot encode .xyz'):
        write_image(str(tmp_path / 'x.xyz'), np.zeros((4, 4, 3)))
    assert os.listdir(tmp_path) == []


def test_list_images(tmp_path, rgb_u8):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for name in ('b.png', 'a.JPG', 'c.txt', '.hidden.png'):
        (folder / name).write_bytes(b'x')
    (folder / 'sub').mkdir()
    (folder / 'sub' / 'd.png').write_bytes(b'x')
    extra = tmp_path / 'z.dat'
    extra.write_bytes(b'x')
    assert list_images([str(folder), str(extra)]) == [str(folder / 'a.JPG'), str(folder / 'b.png'), str(extra)]
    assert list_images(str(folder), recursive=True)[-1] == str(folder / 'sub' / 'd.png')
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'notes.txt').write_text('no images here')
    with pytest.raises(ImageReadError, match='folder contains no images'):
        list_images([str(empty)])
    with pytest.raises(ImageReadError, match='no such file or folder'):
        list_images([str(tmp_path / 'nope')])


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    from PIL import Image, ImageOps
    rgba = np.zeros((6, 10, 4), np.uint8)  # not square, no symmetry: every orientation differs
    rgba[..., 0] = np.arange(60).reshape(6, 10)
    rgba[..., 1] = np.arange(6)[:, None] * 40
    rgba[..., 3] = 255 - np.arange(10)[None] * 20
    stored = Image.fromarray(rgba, 'RGBA')
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / 'phone.png')
    stored.save(path, exif=exif.tobytes())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)))  # how viewers show it

    img, info = read_image(path)
    assert info.orientation == orientation and info.size == upright.shape[:2]
    assert np.array_equal(np.round(img * 255).astype(np.uint8), upright[..., :3])
    assert np.array_equal(np.round(info.alpha * 255).astype(np.uint8), upright[..., 3])
    # the result is written without the tag, so it is shown the way the input was
    out = str(tmp_path / 'out.png')
    write_image(out, img, info)
    with Image.open(out) as written:
        assert written.getexif().get(0x0112, 1) == 1
        assert np.array_equal(np.asarray(written), upright)


@pytest.mark.parametrize('ext', ['jpg', 'webp'])
def test_text_travels_in_the_exif_of_jpeg_and_webp(tmp_path, rgb_u8, ext):
    """encode_image's text in a JPEG or WebP (with or without alpha) reads back; the file stays a
    valid image for PIL and OpenCV; an ImageDescription of another kind is no text."""
    rgb = rgb_u8[:, :, ::-1].astype(np.float32) / 255.
    text = {'vqir:original_size': '640x480', 'vqir:ir_scale': '16'}
    alphas = [None, np.linspace(0, 1, rgb.shape[1], dtype=np.float32)[None].repeat(rgb.shape[0], 0)]
    for alpha in alphas if ext == 'webp' else alphas[:1]:
        path = str(tmp_path / f'lr.{ext}')
        write_image(path, rgb, text=text, alpha=alpha, quality=90)
        img, info = read_image(path)
        assert info.text == text and info.mode == ('rgb' if alpha is None else 'rgba')
        with Image.open(path) as pil:
            pil.load()
            assert pil.size == (rgb.shape[1], rgb.shape[0])
        assert cv2.imread(path).shape == rgb.shape
    camera = str(tmp_path / f'camera.{ext}')
    exif = Image.Exif()
    exif[0x010E] = 'OLYMPUS DIGITAL CAMERA'
    Image.fromarray(rgb_u8[:, :, ::-1]).save(camera, exif=exif.tobytes())
    assert read_image(camera)[1].text == {}
    with pytest.raises(ImageWriteError, match='keys without "="'):
        write_image(str(tmp_path / f'bad.{ext}'), rgb, text={'a=b': 'c'})
    with pytest.raises(ImageWriteError, match=r'text can be stored in .png, .jpg and .webp files only'):
        write_image(str(tmp_path / 'x.bmp'), rgb, text=text)
