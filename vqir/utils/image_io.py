"""The project's one image reader and writer: every way a file can be wrong is one clear error.

Everything that reads an image goes through ``decode_image`` (the datasets, which get bytes from
a folder or an LMDB, ``test.py``, ``vqir-rescale`` and the data scripts), so a JPEG is read the
same way everywhere; everything that writes one goes through ``encode_image`` / ``write_image``,
and ``IMAGE_EXTENSIONS`` is the one list of file types a folder is searched for.

``read_image`` returns an RGB float32 image in [0, 1] and an :class:`ImageInfo` that remembers
what the file was (grey / RGB / RGBA, 8 or 16 bits, its PNG text chunks), so that
``write_image`` can give the result back in the same form. Decoding uses OpenCV with
``cv2.IMREAD_UNCHANGED`` (alpha and 16-bit samples are kept); the bit depth is taken from the
decoded array's dtype, never guessed from pixel values. An EXIF orientation tag (phone photos) is
applied, so the network sees the image the way viewers show it; results are written without
the tag and so are shown the same way.

Before anything is decoded the header is read (PIL, lazily) and images with more than
``max_pixels`` pixels are refused, so a small file that would expand into gigabytes
(a decompression bomb) costs nothing.

Writing is atomic: the encoded file goes to a temporary name in the target folder and is
renamed over the target, so an interrupted or failed write never leaves a partial image.
"""
import io
import os
import struct
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image

from .atomic_file import atomic_write_bytes
from .errors import InputError

__all__ = [
    'IMAGE_EXTENSIONS', 'DEFAULT_MAX_PIXELS', 'ImageReadError', 'ImageWriteError', 'ImageInfo', 'decode_image',
    'read_image', 'encode_image', 'write_image', 'list_images', 'list_image_files'
]

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
DEFAULT_MAX_PIXELS = 20000 * 20000
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# the IEND chunk: zero length, type, CRC
_PNG_END_CHUNK = b'\x00\x00\x00\x00IEND\xaeB\x60\x82'
_MAX_VALUE = {np.dtype(np.uint8): 255., np.dtype(np.uint16): 65535.}
_FLOAT_FORMATS = ((b'#?RADIANCE', 'Radiance HDR'), (b'#?RGBE', 'Radiance HDR'), (b'PF\n', 'PFM'), (b'Pf\n', 'PFM'),
                  (b'v/1\x01', 'OpenEXR'))


class ImageReadError(InputError, ValueError):
    """An input image cannot be used; the message starts with the file name."""


class ImageWriteError(InputError, ValueError):
    """An image cannot be written as asked; the message starts with the file name."""


@dataclass
class ImageInfo:
    """What an image file held, so that a result can be written back in the same form.

    Attributes:
        path: the file read.
        mode: 'gray' (one channel), 'rgb' or 'rgba' (grey + alpha files decode as 'rgba').
        bit_depth: 8 or 16, from the decoded dtype (uint8 / uint16).
        size: (H, W) of the image.
        alpha: (H, W) float32 in [0, 1] for 'rgba', else None.
        text: PNG text chunks (tEXt / iTXt / zTXt), or the ``key=value`` lines of a JPEG's or WebP's
            EXIF ImageDescription, as {key: value}; empty otherwise.
        orientation: the file's EXIF orientation (1-8; 1 when it has none), already applied.
    """
    path: str
    mode: str
    bit_depth: int
    size: tuple
    alpha: np.ndarray = None
    text: dict = field(default_factory=dict)
    orientation: int = 1


@contextmanager
def _pil_without_bomb_limit():
    """PIL's own decompression-bomb limit (about 179 MP) would refuse images below our
    ``max_pixels``; the size check here is ours, so PIL's is lifted while the header is read."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# EXIF orientation -> the array operation that shows the image upright (as PIL's exif_transpose)
_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_DESCRIPTION_TAG = 0x010E  # ImageDescription: where JPEG and WebP files keep encode_image's text
_ORIENT = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise: turn clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transversed
    8: lambda a: np.rot90(a, 1),  # stored rotated 90 clockwise: turn counter-clockwise
}


def _exif_orientation(img):
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block is not a reason to refuse the pixels
        return 1
    return value if value in _ORIENT else 1


def _exif_text(img):
    """{key: value} from the ``key=value`` lines of a JPEG's or WebP's EXIF ImageDescription (what
    :func:`encode_image` writes there); {} for a description of another kind or none."""
    try:
        description = img.getexif().get(_EXIF_DESCRIPTION_TAG)
    except Exception:  # a malformed EXIF block is not a reason to refuse the pixels
        return {}
    if not isinstance(description, str):
        return {}
    pairs = [line.split('=', 1) for line in description.splitlines() if '=' in line]
    return {key: value for key, value in pairs if key}


def _read_header(data):
    """(format, (H, W), text, EXIF orientation) from the header alone, or (None, None, {}, 1) if PIL
    cannot identify it. The text: a PNG's text chunks, a JPEG's or WebP's EXIF key=value lines."""
    try:
        with _pil_without_bomb_limit(), Image.open(io.BytesIO(data)) as img:
            if img.format == 'PNG':
                text = {str(k): str(v) for k, v in img.info.items() if isinstance(v, str)}
            else:
                text = _exif_text(img) if img.format in ('JPEG', 'WEBP') else {}
            return img.format, (img.height, img.width), text, _exif_orientation(img)
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error):
        # PIL does not know every format OpenCV decodes (and vice versa); the decoder decides
        return None, None, {}, 1


def _check_pixels(path, size, max_pixels):
    height, width = size
    if height <= 0 or width <= 0:
        raise ImageReadError(f'{path}: image has no pixels ({width}x{height})')
    if max_pixels is not None and height * width > max_pixels:
        raise ImageReadError(f'{path}: image is {width}x{height} = {height * width:,} pixels, more than the limit of '
                             f'{max_pixels:,} (possible decompression bomb; raise max_pixels to read it)')


def read_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Read an image file as RGB float32 in [0, 1].

    Args:
        path: image file (PNG, JPEG, BMP, TIFF, WebP, PPM/PGM, anything OpenCV decodes).
        max_pixels: refuse images with more pixels (checked from the header before decoding
            where the format allows, else after decoding); None for no limit.

    Returns:
        (img, info) as :func:`decode_image`.

    Raises:
        ImageReadError naming the file: missing, a folder, unreadable, or any error of
        :func:`decode_image`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageReadError(f'{path}: no such file')
    if not os.path.isfile(path):
        raise ImageReadError(f'{path}: not a file')
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        raise ImageReadError(f'{path}: cannot be read ({err.strerror or err})') from None
    return decode_image(data, path, max_pixels)


def decode_image(data, path, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode the bytes of an image file as RGB float32 in [0, 1].

    Args:
        data: the encoded file (bytes, or None for a missing LMDB entry).
        path: what the bytes are (a file, or an LMDB folder and key); it starts every error message.
        max_pixels: as :func:`read_image`.

    Returns:
        (img, info): img (H, W, 3) float32 in [0, 1], RGB (grey images repeated over three
        channels, alpha removed), turned upright by the EXIF orientation; info an :class:`ImageInfo`.

    Raises:
        ImageReadError naming ``path``: empty, not an image, truncated or corrupt, an unsupported
        sample type or channel count, or too many pixels.
    """
    path = os.fspath(path)
    if not data:
        raise ImageReadError(f'{path}: empty file')
    data = bytes(data)

    file_format, size, text, orientation = _read_header(data)
    if size is not None:
        _check_pixels(path, size, max_pixels)
    # floating-point formats decode to float32, which is refused below anyway; OpenCV decodes
    # them through a temporary file that it leaves behind when the header is refused
    for signature, name in _FLOAT_FORMATS:
        if data.startswith(signature):
            raise ImageReadError(f'{path}: {name} images are not read (floating-point samples; 8- and 16-bit '
                                 'integer images are)')
    # libpng hands back the rows it got from a cut-off file without an error; bytes after the
    # end chunk (some tools append data) are harmless and decoders ignore them
    if data.startswith(_PNG_SIGNATURE) and _PNG_END_CHUNK not in data:
        raise ImageReadError(f'{path}: truncated PNG file (it has no IEND chunk)')

    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # OpenCV asserts, e.g. on headers beyond CV_IO_MAX_IMAGE_PIXELS
        if 'CV_IO_MAX_IMAGE_PIXELS' in str(err):
            raise ImageReadError(f'{path}: its header claims more pixels than OpenCV decodes '
                                 f'(possible decompression bomb)') from None
        raise ImageReadError(f'{path}: cannot be decoded (OpenCV: {getattr(err, "err", None) or "error"})') from None
    if img is None:
        if file_format is None:
            raise ImageReadError(f'{path}: not an image, or a format that cannot be decoded')
        raise ImageReadError(f'{path}: {file_format} data cannot be decoded (truncated or corrupt file)')
    if img.size == 0:
        raise ImageReadError(f'{path}: image has no pixels')
    _check_pixels(path, img.shape[:2], max_pixels)
    if img.dtype not in _MAX_VALUE:
        raise ImageReadError(f'{path}: unsupported sample type {img.dtype} (8- and 16-bit integer images are read)')
    bit_depth = 8 if img.dtype == np.uint8 else 16
    if orientation != 1:
        img = _ORIENT[orientation](img)

    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    alpha = None
    if img.ndim == 2:
        mode = 'gray'
        rgb = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 3:
        mode = 'rgb'
        rgb = img[:, :, ::-1]
    elif img.ndim == 3 and img.shape[2] == 2:  # grey + alpha (OpenCV usually expands it to 4 channels)
        mode = 'rgba'
        rgb = np.repeat(img[:, :, :1], 3, axis=2)
        alpha = img[:, :, 1].astype(np.float32) / _MAX_VALUE[img.dtype]
    elif img.ndim == 3 and img.shape[2] == 4:
        mode = 'rgba'
        rgb = img[:, :, 2::-1]
        alpha = img[:, :, 3].astype(np.float32) / _MAX_VALUE[img.dtype]
    else:
        raise ImageReadError(f'{path}: unsupported channel layout {img.shape} (expected grey, RGB or RGBA)')
    rgb = np.ascontiguousarray(rgb).astype(np.float32) / _MAX_VALUE[img.dtype]
    info = ImageInfo(path=path, mode=mode, bit_depth=bit_depth, size=tuple(img.shape[:2]), alpha=alpha, text=text,
                     orientation=orientation)
    return rgb, info


def _to_hwc_numpy(img, path):
    """(H, W, 3) numpy, (3, H, W) or (1, 3, H, W) tensor -> (H, W, 3) float32 numpy."""
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu()
        if img.dim() == 4 and img.shape[0] == 1:
            img = img[0]
        if img.dim() != 3 or img.shape[0] != 3:
            raise ImageWriteError(f'{path}: expected a (3, H, W) or (1, 3, H, W) tensor, got {tuple(img.shape)}')
        img = img.permute(1, 2, 0).numpy()
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ImageWriteError(f'{path}: expected an (H, W, 3) RGB image, got shape {img.shape}')
    return img


def _png_text_chunk(key, value):
    """A PNG iTXt chunk (UTF-8, uncompressed): length, type, data, CRC."""
    if not 1 <= len(key) <= 79 or '\0' in key:
        raise ValueError(f'PNG text key must have 1 to 79 characters and no NUL, got {key!r}')
    data = key.encode('latin-1') + b'\0\0\0\0\0' + str(value).encode('utf-8')
    return struct.pack('>I', len(data)) + b'iTXt' + data + struct.pack('>I', zlib.crc32(b'iTXt' + data))


def _insert_png_text(png, text):
    """Insert text chunks right after IHDR (before the image data, where readers look first)."""
    ihdr_end = len(_PNG_SIGNATURE) + 8 + struct.unpack('>I', png[8:12])[0] + 4
    return png[:ihdr_end] + b''.join(_png_text_chunk(k, v) for k, v in text.items()) + png[ihdr_end:]


def _exif_with_text(text):
    """EXIF (TIFF) data whose ImageDescription holds ``text`` as key=value lines."""
    for key, value in text.items():
        if not key or '=' in key or '\n' in f'{key}{value}':
            raise ValueError(f'text for EXIF needs keys without "=" and no line breaks, got {key!r}: {value!r}')
    exif = Image.Exif()
    exif[_EXIF_DESCRIPTION_TAG] = '\n'.join(f'{k}={v}' for k, v in text.items())
    data = exif.tobytes()
    return data[len(b'Exif\0\0'):] if data.startswith(b'Exif\0\0') else data


def _insert_jpeg_exif(jpeg, text):
    """An APP1 Exif segment right after the SOI marker (where EXIF readers look)."""
    payload = b'Exif\0\0' + _exif_with_text(text)
    return jpeg[:2] + b'\xff\xe1' + struct.pack('>H', len(payload) + 2) + payload + jpeg[2:]


def _riff_chunk(fourcc, payload):
    return fourcc + struct.pack('<I', len(payload)) + payload + (b'\0' if len(payload) % 2 else b'')


def _insert_webp_exif(webp, text, width, height, has_alpha):
    """The WebP as an extended file (a VP8X chunk with the EXIF flag) with an EXIF chunk at its end.

    OpenCV writes the simple format (one VP8 / VP8L chunk), or VP8X + ALPH + VP8 with alpha."""
    chunks = []
    offset = 12
    while offset + 8 <= len(webp):
        fourcc, size = webp[offset:offset + 4], struct.unpack('<I', webp[offset + 4:offset + 8])[0]
        chunks.append((fourcc, webp[offset + 8:offset + 8 + size]))
        offset += 8 + size + size % 2
    if chunks and chunks[0][0] == b'VP8X':
        flags = chunks[0][1][0] | 0x08
        vp8x = bytes([flags]) + chunks[0][1][1:]
        chunks = chunks[1:]
    else:
        flags = 0x08 | (0x10 if has_alpha else 0)
        vp8x = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, 'little') + (height - 1).to_bytes(3, 'little')
    body = b'WEBP' + _riff_chunk(b'VP8X', vp8x) + b''.join(_riff_chunk(f, p) for f, p in chunks)
    body += _riff_chunk(b'EXIF', _exif_with_text(text))
    return b'RIFF' + struct.pack('<I', len(body)) + body


def encode_image(path, rgb01, info=None, bit_depth=8, alpha=None, text=None, png_compression=None, quality=None):
    """Encode an RGB image in [0, 1] (values outside are clamped) as the bytes of an image file.

    Args:
        path: the file the bytes are for: its extension picks the format (16 bits and alpha need
            PNG or TIFF), and it starts every error message.
        rgb01: (H, W, 3) float array, or a (3, H, W) / (1, 3, H, W) tensor, RGB in [0, 1].
        info: the :class:`ImageInfo` of the input this result stands for: a 'gray' input is
            written as one channel (ITU-R BT.601 luma), an 'rgba' input with its alpha
            (``info.alpha``, which must then have the image's size; pass ``alpha`` to give a
            resized one).
        bit_depth: 8 or 16.
        alpha: (H, W) float array in [0, 1]; overrides ``info.alpha``.
        text: {key: value} to store in the file: PNG text chunks, or ``key=value`` lines in the
            EXIF ImageDescription of a JPEG or WebP (read back into ``ImageInfo.text``).
        png_compression: zlib level 0-9 for PNG (None: OpenCV's default); pixels are the same.
        quality: 1-100 for JPEG and WebP (None: OpenCV's defaults, 95 and lossless-near 100).

    Raises:
        ImageWriteError naming ``path`` for shapes or options the format cannot store.
    """
    path = os.fspath(path)
    img = _to_hwc_numpy(rgb01, path)
    if bit_depth not in (8, 16):
        raise ImageWriteError(f'{path}: bit_depth must be 8 or 16, got {bit_depth!r}')
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        raise ImageWriteError(f'{path}: no file extension to choose the format from')
    if alpha is None and info is not None and info.mode == 'rgba':
        alpha = info.alpha
    if alpha is not None:
        alpha = np.asarray(alpha, dtype=np.float32)
        if alpha.shape != img.shape[:2]:
            raise ImageWriteError(f'{path}: alpha is {alpha.shape[1]}x{alpha.shape[0]} but the image is '
                                  f'{img.shape[1]}x{img.shape[0]}')
    if bit_depth == 16 and ext not in ('.png', '.tif', '.tiff'):
        raise ImageWriteError(f'{path}: {ext} cannot store 16 bits per sample (use .png or .tif)')
    if alpha is not None and ext not in ('.png', '.tif', '.tiff', '.webp'):
        raise ImageWriteError(f'{path}: {ext} cannot store an alpha channel (use .png)')
    if text and ext not in ('.png', '.jpg', '.jpeg', '.webp'):
        raise ImageWriteError(f'{path}: text can be stored in .png, .jpg and .webp files only')
    params = []
    if png_compression is not None:
        if ext != '.png' or not 0 <= png_compression <= 9:
            raise ImageWriteError(f'{path}: png_compression {png_compression!r} needs a .png file and a level 0-9')
        params = [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)]
    if quality is not None:
        flags = {'.jpg': cv2.IMWRITE_JPEG_QUALITY, '.jpeg': cv2.IMWRITE_JPEG_QUALITY, '.webp': cv2.IMWRITE_WEBP_QUALITY}
        if ext not in flags or not 1 <= quality <= 100:
            raise ImageWriteError(f'{path}: quality {quality!r} needs a .jpg or .webp file and a value 1-100')
        params = [flags[ext], int(quality)]

    max_value = 65535. if bit_depth == 16 else 255.
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    img = np.clip(img, 0., 1.)
    if info is not None and info.mode == 'gray':
        out = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        out = img[:, :, ::-1]  # OpenCV writes BGR
        if alpha is not None:
            out = np.concatenate([out, np.clip(alpha, 0., 1.)[:, :, None]], axis=2)
    out = np.round(out * max_value).astype(dtype)

    try:
        ok, encoded = cv2.imencode(ext, out, params)
    except cv2.error:
        ok = False
    if not ok:
        raise ImageWriteError(f'{path}: OpenCV cannot encode {ext} images')
    data = encoded.tobytes()
    if text:
        try:
            if ext == '.png':
                data = _insert_png_text(data, text)
            elif ext == '.webp':
                data = _insert_webp_exif(data, text, img.shape[1], img.shape[0], alpha is not None)
            else:
                data = _insert_jpeg_exif(data, text)
        except ValueError as err:
            raise ImageWriteError(f'{path}: {err}') from None
    return data


def write_image(path, rgb01, info=None, **options):
    """Write an RGB image in [0, 1] atomically: encoded by :func:`encode_image` (same options),
    written to a temporary name in the target folder and renamed over ``path``, so an interrupted
    or failed write never leaves a partial image. Missing folders are created.

    Raises:
        ImageWriteError naming the file for shapes or options the format cannot store;
        OSError if the file system refuses.
    """
    atomic_write_bytes(path, encode_image(path, rgb01, info, **options))


def _images_in_folder(folder, recursive):
    """Image files (``IMAGE_EXTENSIONS``, any case) in ``folder`` as sorted paths relative to it,
    hidden files and folders skipped."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.')) if recursive else []
        found += [
            os.path.relpath(os.path.join(root, n), folder) for n in names
            if not n.startswith('.') and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def list_image_files(folder):
    """The image files below ``folder`` (recursive), as sorted paths relative to it: what a
    dataset or a data-preparation script reads.

    Raises:
        FileNotFoundError if ``folder`` is not a folder; ValueError if it holds no image file.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'image folder does not exist: {folder}')
    names = _images_in_folder(folder, recursive=True)
    if not names:
        raise ValueError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) found in folder: {folder}')
    return names


def list_images(paths, recursive=False):
    """Expand files and folders into a list of image files.

    A file given by name is kept whatever its extension (reading it reports what is wrong); a
    folder contributes its files with an image extension (``IMAGE_EXTENSIONS``), sorted by
    name, hidden files skipped. ``paths`` may be one path or a list; the order of ``paths``
    is kept.

    Raises:
        ImageReadError naming the path: it does not exist, or a folder holds no images.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = _images_in_folder(path, recursive)
            if not found:
                raise ImageReadError(f'{path}: folder contains no images ({", ".join(IMAGE_EXTENSIONS)})')
            files += [os.path.join(path, name) for name in found]
        elif os.path.exists(path):
            files.append(path)
        else:
            raise ImageReadError(f'{path}: no such file or folder')
    return files
