"""Colour error as a basicsr image metric: mean CIEDE2000 (lower is better), ``type: calculate_ciede2000``.

PSNR and SSIM on Y, the field's headline metrics, cannot see colour: a reconstruction painted in
the wrong hue can keep its Y-PSNR. CIEDE2000 (CIE 2000 colour difference in CIELAB, D65) is the
standard measure of how different two colours look; about 1 is just noticeable, above 10 is a
different colour. The per-pixel differences come from scikit-image and are averaged over the image.
"""
import numpy as np
from basicsr.metrics.metric_util import reorder_image
from basicsr.utils.registry import METRIC_REGISTRY
from skimage.color import deltaE_ciede2000, rgb2lab

__all__ = ['calculate_ciede2000']

# Options that basicsr hands to every metric of a `val.metrics` entry but that this one has no use for.
_SHARED_METRIC_OPTIONS = ('better', 'test_y_channel')


@METRIC_REGISTRY.register()
def calculate_ciede2000(img, img2, crop_border=0, input_order='HWC', **kwargs):
    """Mean CIEDE2000 colour difference between two images (basicsr metric conventions).

    Args:
        img (ndarray): (H, W, 3) BGR image with values in [0, 255] (uint8 from ``tensor2img``).
        img2 (ndarray): the reference image, same shape.
        crop_border (int): pixels removed at each edge before the comparison.
        input_order (str): 'HWC' or 'CHW'.
        **kwargs: only the options basicsr passes to every metric ('better', 'test_y_channel'),
            which are ignored; anything else is an error.

    Returns:
        float: mean CIEDE2000 over the pixels (0 for identical images).
    """
    unknown = sorted(set(kwargs) - set(_SHARED_METRIC_OPTIONS))
    if unknown:
        raise TypeError(f'calculate_ciede2000 got unknown option(s) {unknown}.')
    if img.shape != img2.shape:
        raise ValueError(f'calculate_ciede2000: image shapes differ, {img.shape} vs {img2.shape}.')
    img = reorder_image(img, input_order=input_order)
    img2 = reorder_image(img2, input_order=input_order)
    if img.shape[2] != 3:
        raise ValueError(f'calculate_ciede2000 needs 3-channel images, got shape {img.shape} (HWC).')
    if crop_border != 0:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    lab = [rgb2lab(np.asarray(im, np.float64)[..., ::-1] / 255.0) for im in (img, img2)]
    return float(deltaE_ciede2000(lab[0], lab[1]).mean())
