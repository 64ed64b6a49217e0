"""Argument handling shared by vqir's image metrics (basicsr's conventions: HWC/CHW, BGR, crop border)."""
from basicsr.metrics.metric_util import reorder_image

__all__ = ['SHARED_METRIC_OPTIONS', 'check_shared_options', 'checked_color_pair']

# Options that basicsr hands to every metric of a `val.metrics` entry; a colour metric has no use for them.
SHARED_METRIC_OPTIONS = ('better', 'test_y_channel')


def check_shared_options(metric, kwargs):
    """``kwargs`` may hold only the options basicsr passes to every metric; TypeError names the others."""
    unknown = sorted(set(kwargs) - set(SHARED_METRIC_OPTIONS))
    if unknown:
        raise TypeError(f'{metric} got unknown option(s) {unknown}.')


def checked_color_pair(metric, img, img2, crop_border, input_order, kwargs):
    """Two 3-channel images as (H, W, 3), their borders cropped; errors name ``metric``.

    ``kwargs`` may hold only the options basicsr passes to every metric (``SHARED_METRIC_OPTIONS``)."""
    check_shared_options(metric, kwargs)
    if img.shape != img2.shape:
        raise ValueError(f'{metric}: image shapes differ, {img.shape} vs {img2.shape}.')
    img = reorder_image(img, input_order=input_order)
    img2 = reorder_image(img2, input_order=input_order)
    if img.shape[2] != 3:
        raise ValueError(f'{metric} needs 3-channel images, got shape {img.shape} (HWC).')
    if crop_border != 0:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    return img, img2
