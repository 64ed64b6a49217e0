"""Multi-scale HR dataset of stage 2: an HR crop and its bicubic ↓2 and ↓4 (the MSRM's targets)."""
from basicsr.utils.registry import DATASET_REGISTRY

from vqir.data import transforms
from vqir.data.hr_image_dataset import HRImageDataset


@DATASET_REGISTRY.register()
class MultiScaleHRDataset(HRImageDataset):
    """HRImageDataset plus the targets of the refinement levels.

    Each item holds, besides HRImageDataset's `gt`, `lq` (when ir_scale is set) and paths:
        gt_level2   (3, ceil(H/2), ceil(W/2))   MATLAB-bicubic (antialiased) gt↓2 ("Level_2")
        gt_level4   (3, ceil(H/4), ceil(W/4))   gt↓4 ("Level_4")
    `gt` itself is "Level_1". Both levels are computed from the final (cropped, augmented) gt, so
    they are exactly the bicubic resize of what the item's gt shows.

    Options: those of HRImageDataset (gt_size must be a multiple of 4), plus
        random_downscale (bool | list[float]): train-only augmentation of the reference's stage 2:
            before cropping, the whole HR is resized (bilinear) by a factor drawn uniformly from
            the list; `true` means the reference's [1, 0.5] (half of the images at half
            resolution). Each side stays at least min(side, gt_size) long. Default: true in the
            train phase, false otherwise. It cannot be combined with `dataroot_lq` (the LR files
            would no longer match the resized HR).
    """

    OPTION_KEYS = HRImageDataset.OPTION_KEYS | {'random_downscale'}
    GT_SIZE_MULTIPLE = 4
    REFERENCE_DOWNSCALE_FACTORS = (1.0, 0.5)
    LEVEL_FACTORS = (2, 4)

    def __init__(self, opt):
        super().__init__(opt)
        self.downscale_factors = self._parse_random_downscale(opt.get('random_downscale', self.is_train))

    def _parse_random_downscale(self, value):
        owner = type(self).__name__
        if value is None or value is False:
            return None
        if not self.is_train:
            raise ValueError(f"{owner}: 'random_downscale' is a train augmentation; set it false for phase "
                             f"'{self.phase}'")
        if self.lq_root:
            raise ValueError(f"{owner}: 'random_downscale' cannot be combined with 'dataroot_lq' (resizing the HR "
                             'would break its match with the LR files); disable one of them')
        factors = self.REFERENCE_DOWNSCALE_FACTORS if value is True else value
        if (not isinstance(factors, (list, tuple)) or not factors
                or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in factors)):
            raise ValueError(f"{owner}: 'random_downscale' must be true, false or a list of factors in (0, 1], "
                             f'got {value!r}')
        return tuple(float(f) for f in factors)

    def _before_crop(self, img_gt):
        if self.downscale_factors is None:
            return img_gt
        return transforms.random_downscale(img_gt, self.downscale_factors, self.gt_size)

    def _extra_targets(self, img_gt):
        return {f'gt_level{f}': transforms.bicubic_downscale(img_gt, f) for f in self.LEVEL_FACTORS}
