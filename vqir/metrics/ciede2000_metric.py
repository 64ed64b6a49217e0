"""Colour error as a basicsr image metric: mean CIEDE2000 (lower is better), ``type: calculate_ciede2000``.

PSNR and SSIM on Y, the field's headline metrics, cannot see colour: a reconstruction painted in
the wrong hue can keep its Y-PSNR. CIEDE2000 (CIE 2000 colour difference in CIELAB, D65) is the
standard measure of how different two colours look; about 1 is just noticeable, above 10 is a
different colour. The per-pixel differences come from scikit-image and are averaged over the image.
"""
import numpy as np
from basicsr.utils.registry import METRIC_REGISTRY
from skimage.color import deltaE_ciede2000, rgb2lab

from vqir.metrics.metric_util import checked_color_pair

__all__ = ['calculate_ciede2000']


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
    img, img2 = checked_color_pair('calculate_ciede2000', img, img2, crop_border, input_order, kwargs)
    lab = [rgb2lab(np.asarray(im, np.float64)[..., ::-1] / 255.0) for im in (img, img2)]
    return float(deltaE_ciede2000(lab[0], lab[1]).mean())
