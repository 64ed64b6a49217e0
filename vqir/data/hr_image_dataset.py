"""HR image dataset of stages 0 and 1: HR crops and, for rescaling, their bicubic LR."""
import difflib
import math
import re
from os import path as osp

import numpy as np
from basicsr.data.transforms import augment
from basicsr.utils import FileClient, get_root_logger, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from vqir.data import transforms
from vqir.data.color_augment import ColorAugment, parse_color_augment
from vqir.data.dead_leaves import dead_leaves
from vqir.utils.image_io import ImageReadError, list_image_files
from vqir.utils.img_util import pad_to_multiple

# Keys that basicsr's option parser adds to every dataset's options, or that its dataloader and
# training loop read from them. A dataset accepts them without using them.
PIPELINE_KEYS = frozenset({
    'name', 'type', 'phase', 'scale', 'num_worker_per_gpu', 'batch_size_per_gpu', 'use_shuffle',
    'dataset_enlarge_ratio', 'prefetch_mode', 'num_prefetch_queue', 'pin_memory', 'persistent_workers'
})

IR_SCALES = (16, 32)

# A basicsr meta-info line: "0001_s001.png (480,480,3) 1"; only the name matters here.
_META_LINE = re.compile(r'^(?P<name>.+?)\s+\(\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\)(\s+\d+)?$')


def check_option_keys(opt, known_keys, owner):
    """Raise ValueError naming every key of `opt` that is neither in `known_keys` nor a pipeline key."""
    unknown = sorted(set(opt) - set(known_keys) - PIPELINE_KEYS)
    if not unknown:
        return
    described = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(set(known_keys) | PIPELINE_KEYS), n=1)
        described.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ''))
    raise ValueError(f'{owner}: unknown dataset option {", ".join(described)}; '
                     f'known options: {", ".join(sorted(known_keys))}')


def read_meta_info_names(meta_info_file):
    """Image names (first field of each line) of a basicsr meta-info file or a plain list of names."""
    if not osp.isfile(meta_info_file):
        raise FileNotFoundError(f'meta info file does not exist: {meta_info_file}')
    names = []
    with open(meta_info_file, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if line:
                match = _META_LINE.match(line)
                names.append(match.group('name') if match else line)
    if not names:
        raise ValueError(f'meta info file lists no images: {meta_info_file}')
    return names


@DATASET_REGISTRY.register()
class HRImageDataset(data.Dataset):
    """HR images, optionally with their LR at 1/ir_scale (the IFRM's guide target).

    Each item is a dict of float32 RGB tensors in [0, 1]:
        gt      (3, H, W)   the HR image (train: a random gt_size crop)
        lq      (3, ceil(H/s), ceil(W/s))   only when `ir_scale` (s) is set: read from
                `dataroot_lq`, or MATLAB-bicubic (antialiased) HR↓s computed on the fly
        gt_path, lq_path    file paths (lmdb keys for the lmdb backend); lq_path is gt_path
                when the LR is computed on the fly

    Options (basicsr style; an unknown key is an error):
        dataroot_gt (str): folder of HR images (searched recursively), or a `.lmdb` folder.
        dataroot_lq (str, optional): LR images at 1/ir_scale whose names equal the HR names
            (extension aside; lmdb: equal keys). Every HR image needs its LR. Without it the LR
            is computed on the fly. Requires `ir_scale`.
        meta_info_file (str, optional): list of HR names relative to `dataroot_gt` (basicsr
            meta-info format, first field of each line). Default: scan the folder; for lmdb the
            `meta_info.txt` inside `dataroot_gt`.
        io_backend (dict): `{type: disk}` (default) or `{type: lmdb}` (extra keys go to lmdb.open).
        ir_scale (int, optional): 16 or 32.
        gt_size (int): train crop size; a multiple of ir_scale (and of GT_SIZE_MULTIPLE).
        use_hflip, use_rot (bool): train flips and 90° rotations (basicsr `augment`), applied
            identically to gt and a read LR. Default true, as in the reference.
        mod_crop (bool): val/test only: crop HR to a multiple of ir_scale by removing bottom rows
            and right columns, as the reference does. Default false: the HR keeps its size and,
            when its sides are not multiples of ir_scale, the on-the-fly LR is computed from the
            HR reflect-padded at the bottom/right to the next multiple (the model pads the same
            way), so lq is ceil(H/s) x ceil(W/s).
        color (str): 'rgb' only (the channel order of the returned tensors); BGR for the
            reference's stage-1 quirk is the model's business (`network_color: bgr`).
        color_augment (dict, optional): train-only random colour matrix (hue rotation, saturation,
            exposure, channel order) applied to the crop (and a read LR), see
            :func:`vqir.data.color_augment.parse_color_augment`. Default: none.
        dead_leaves_prob (float): train only: probability that a sample's HR is a procedural
            dead-leaves image (:func:`vqir.data.dead_leaves.dead_leaves`) of gt_size instead of a
            crop of a file, for colours and shapes that a small set lacks. Default 0. Cannot be
            combined with `dataroot_lq`.

    Files: 8- or 16-bit (scaled by dtype), grayscale (made 3-channel), RGBA (alpha dropped).
    Train crops: an image smaller than gt_size is reflect-padded up to it (logged once). With
    LR files the crop corner is a multiple of ir_scale so that the LR crop covers the same area.
    """

    OPTION_KEYS = frozenset({
        'dataroot_gt', 'dataroot_lq', 'meta_info_file', 'io_backend', 'gt_size', 'use_hflip', 'use_rot',
        'ir_scale', 'mod_crop', 'color', 'color_augment', 'dead_leaves_prob'
    })
    # gt_size must be a multiple of this as well as of ir_scale.
    GT_SIZE_MULTIPLE = 1

    def __init__(self, opt):
        super().__init__()
        owner = type(self).__name__
        check_option_keys(opt, self.OPTION_KEYS, owner)
        self.opt = opt
        if not opt.get('phase'):
            raise ValueError(f"{owner}: dataset option 'phase' is required ('train', 'val' or 'test')")
        self.phase = opt['phase']
        self.is_train = self.phase == 'train'

        if not opt.get('dataroot_gt'):
            raise ValueError(f"{owner}: dataset option 'dataroot_gt' is required")
        self.gt_root = str(opt['dataroot_gt'])
        self.lq_root = str(opt['dataroot_lq']) if opt.get('dataroot_lq') else None

        self.ir_scale = opt.get('ir_scale')
        if self.ir_scale is not None and self.ir_scale not in IR_SCALES:
            raise ValueError(f"{owner}: 'ir_scale' must be one of {IR_SCALES}, got {self.ir_scale!r}")
        if self.lq_root and self.ir_scale is None:
            raise ValueError(f"{owner}: 'dataroot_lq' needs 'ir_scale' (the scale of the LR images)")
        self.mod_crop = bool(opt.get('mod_crop', False))
        if self.mod_crop and self.ir_scale is None:
            raise ValueError(f"{owner}: 'mod_crop' needs 'ir_scale' (the multiple to crop to)")
        color = str(opt.get('color', 'rgb')).lower()
        if color != 'rgb':
            raise ValueError(f"{owner}: 'color' must be 'rgb' (the only supported value), got {opt['color']!r}")

        if self.is_train:
            self.gt_size = opt.get('gt_size')
            multiple = math.lcm(self.ir_scale or 1, self.GT_SIZE_MULTIPLE)
            if not isinstance(self.gt_size, int) or self.gt_size <= 0 or self.gt_size % multiple:
                raise ValueError(f"{owner}: train option 'gt_size' must be a positive multiple of {multiple}, "
                                 f'got {self.gt_size!r}')
        else:
            self.gt_size = None
        self.color_augment = parse_color_augment(opt.get('color_augment'), owner)
        self.dead_leaves_prob = opt.get('dead_leaves_prob', 0)
        if (not isinstance(self.dead_leaves_prob, (int, float)) or isinstance(self.dead_leaves_prob, bool)
                or not 0 <= self.dead_leaves_prob <= 1):
            raise ValueError(f"{owner}: 'dead_leaves_prob' must be a number in [0, 1], got {self.dead_leaves_prob!r}")
        if not self.is_train and (self.color_augment is not None or self.dead_leaves_prob):
            raise ValueError(f"{owner}: 'color_augment' and 'dead_leaves_prob' are train augmentations; remove them "
                             f"for phase '{self.phase}'")
        if self.lq_root and self.dead_leaves_prob:
            raise ValueError(f"{owner}: 'dead_leaves_prob' cannot be combined with 'dataroot_lq' (a generated HR "
                             'has no LR file); disable one of them')
        self.use_hflip = bool(opt.get('use_hflip', True))
        self.use_rot = bool(opt.get('use_rot', True))

        self.io_backend_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        self.backend = self.io_backend_opt.pop('type', 'disk')
        if self.backend == 'disk' and self.io_backend_opt:
            raise ValueError(f"{owner}: io_backend 'disk' takes no options, got {sorted(self.io_backend_opt)}")
        if self.backend not in ('disk', 'lmdb'):
            raise ValueError(f"{owner}: io_backend type must be 'disk' or 'lmdb', got {self.backend!r}")
        self.samples = self._scan_lmdb() if self.backend == 'lmdb' else self._scan_folders()
        self.file_client = None  # opened lazily, once per dataloader worker
        self._warned_small = False

    # ----------------------------------------------------------------------------------------
    # listing
    def _scan_folders(self):
        """[(gt_path, lq_path or None)] for the disk backend."""
        if self.opt.get('meta_info_file'):
            names = read_meta_info_names(self.opt['meta_info_file'])
        else:
            names = list_image_files(self.gt_root)
        gt_paths = [osp.join(self.gt_root, name) for name in names]
        if not self.lq_root:
            return [(path, None) for path in gt_paths]

        lq_by_stem = {}
        for name in list_image_files(self.lq_root):
            stem = osp.splitext(name)[0]
            if stem in lq_by_stem:
                raise ValueError(f'two LR images share the name {stem!r} in {self.lq_root}: '
                                 f'{osp.basename(lq_by_stem[stem])} and {osp.basename(name)}')
            lq_by_stem[stem] = osp.join(self.lq_root, name)
        return [(gt_path, self._matching_lq(lq_by_stem, osp.splitext(name)[0], gt_path))
                for name, gt_path in zip(names, gt_paths)]

    def _scan_lmdb(self):
        """[(gt_key, lq_key or None)] for the lmdb backend; the keys are names without extension."""
        for root in filter(None, (self.gt_root, self.lq_root)):
            if not root.rstrip('/').endswith('.lmdb'):
                raise ValueError(f"io_backend 'lmdb' needs a '.lmdb' folder, got {root}")
        meta_file = self.opt.get('meta_info_file') or osp.join(self.gt_root, 'meta_info.txt')
        gt_keys = [osp.splitext(name)[0] for name in read_meta_info_names(meta_file)]
        self.io_backend_opt['db_paths'] = [self.gt_root] + ([self.lq_root] if self.lq_root else [])
        self.io_backend_opt['client_keys'] = ['gt'] + (['lq'] if self.lq_root else [])
        if not self.lq_root:
            return [(key, None) for key in gt_keys]
        lq_keys = {stem: stem for stem in (osp.splitext(name)[0]
                                           for name in read_meta_info_names(osp.join(self.lq_root, 'meta_info.txt')))}
        return [(key, self._matching_lq(lq_keys, key, key)) for key in gt_keys]

    def _matching_lq(self, lq_by_stem, stem, gt_path):
        if stem not in lq_by_stem:
            raise FileNotFoundError(f'no LR image named {stem!r} in {self.lq_root} for the HR image {gt_path}')
        return lq_by_stem[stem]

    # ----------------------------------------------------------------------------------------
    # reading
    def _read(self, path, client_key):
        """Image at `path` (lmdb: key) as float32 (H, W, 3) BGR in [0, 1]."""
        if self.file_client is None:
            self.file_client = FileClient(self.backend, **self.io_backend_opt)
        name = path
        if self.backend == 'lmdb':
            name = f'{self.gt_root if client_key == "gt" else self.lq_root} [key {path!r}]'
        try:
            content = self.file_client.get(path, client_key)
        except OSError as error:
            raise ImageReadError(f'{name}: cannot be read ({error.strerror or error})') from None
        if content is None:
            raise ImageReadError(f'{name}: no such key in the LMDB')
        return transforms.read_bgr(content, name)[0]

    # ----------------------------------------------------------------------------------------
    # geometry
    def _check_lq_shape(self, img_gt, img_lq, gt_path, lq_path, accept_floor):
        """The LR must be ceil(H/s) x ceil(W/s) (or, where `accept_floor`, floor) of the HR."""
        s = self.ir_scale
        (h, w), (lh, lw) = img_gt.shape[:2], img_lq.shape[:2]
        ceil_hw = (-(-h // s), -(-w // s))
        accepted = {ceil_hw, (h // s, w // s)} if accept_floor else {ceil_hw}
        if (lh, lw) not in accepted:
            hint = '' if accept_floor else '; LR files made from mod-cropped HR need mod_crop: true'
            raise ValueError(f'LR image {lq_path} is {lh}x{lw}, but the HR image {gt_path} is {h}x{w} '
                             f'and needs an LR of {" or ".join(f"{a}x{b}" for a, b in sorted(accepted))} '
                             f'at ir_scale {s}{hint}')

    def _before_crop(self, img_gt):
        """Hook for augmentations of the whole HR image before the train crop."""
        return img_gt

    def _train_crop(self, img_gt, img_lq, gt_path, lq_path):
        """Random gt_size crop of the HR and, when read from disk, the matching LR crop."""
        size, s = self.gt_size, self.ir_scale
        if img_lq is not None:
            self._check_lq_shape(img_gt, img_lq, gt_path, lq_path, accept_floor=True)
        if img_gt.shape[0] < size or img_gt.shape[1] < size:
            if not self._warned_small:
                get_root_logger().warning(
                    f'{type(self).__name__}: {gt_path} is {img_gt.shape[0]}x{img_gt.shape[1]}, smaller than '
                    f'gt_size {size}; such images are reflect-padded to the crop size (logged once)')
                self._warned_small = True
            if img_lq is not None:
                # first bring the HR to exactly s times the LR, so that both paddings start at the same place
                lq_h, lq_w = img_lq.shape[:2]
                img_gt = transforms.pad_reflect(img_gt[:lq_h * s, :lq_w * s], lq_h * s, lq_w * s)
                img_lq = transforms.pad_reflect(img_lq, size // s, size // s)
            img_gt = transforms.pad_reflect(img_gt, size, size)

        if img_lq is None:
            top, left = transforms.random_crop_box(img_gt.shape[0], img_gt.shape[1], size)
            return transforms.crop(img_gt, top, left, size, size), None
        top, left = transforms.random_crop_box(img_gt.shape[0], img_gt.shape[1], size, align=s)
        img_lq = transforms.crop(img_lq, top // s, left // s, size // s, size // s)
        return transforms.crop(img_gt, top, left, size, size), img_lq

    def _eval_geometry(self, img_gt, img_lq, gt_path, lq_path):
        """Val/test: optional mod-crop of the HR, and the matching extent of a read LR."""
        s = self.ir_scale
        if img_lq is not None:
            self._check_lq_shape(img_gt, img_lq, gt_path, lq_path, accept_floor=self.mod_crop)
        if self.mod_crop:
            img_gt = transforms.mod_crop(img_gt, s)
            if img_lq is not None:
                img_lq = img_lq[:img_gt.shape[0] // s, :img_gt.shape[1] // s]
        return img_gt, img_lq

    def _extra_targets(self, img_gt):
        """Hook for further targets derived from the final HR image, {key: (H', W', 3) array}."""
        return {}

    def make_lq(self, img_gt):
        """Bicubic LR of an HR image, (H, W, 3) -> (ceil(H/s), ceil(W/s), 3), from the padded HR."""
        return transforms.bicubic_downscale(pad_to_multiple(img_gt, self.ir_scale), self.ir_scale)

    # ----------------------------------------------------------------------------------------
    def __getitem__(self, index):
        gt_path, lq_path = self.samples[index]
        generated = self.is_train and self.dead_leaves_prob and np.random.uniform() < self.dead_leaves_prob
        if generated:
            img_gt, img_lq, gt_path = dead_leaves(self.gt_size), None, 'dead_leaves'
        else:
            img_gt = self._read(gt_path, 'gt')
            img_lq = None if lq_path is None else self._read(lq_path, 'lq')

        if self.is_train:
            if not generated:
                img_gt = self._before_crop(img_gt)
                img_gt, img_lq = self._train_crop(img_gt, img_lq, gt_path, lq_path)
            pair = augment([img_gt] if img_lq is None else [img_gt, img_lq], self.use_hflip, self.use_rot)
            img_gt, img_lq = (pair, None) if img_lq is None else pair
            if self.color_augment is not None:
                matrix = self.color_augment.random_matrix()
                img_gt = ColorAugment.apply(img_gt, matrix)
                img_lq = None if img_lq is None else ColorAugment.apply(img_lq, matrix)
        else:
            img_gt, img_lq = self._eval_geometry(img_gt, img_lq, gt_path, lq_path)

        # derived targets come from the final (cropped, augmented) HR, so they match it exactly
        images = {'gt': img_gt, **self._extra_targets(img_gt)}
        if self.ir_scale is not None:
            images['lq'] = img_lq if img_lq is not None else self.make_lq(img_gt)
        item = {key: img2tensor(np.ascontiguousarray(img), bgr2rgb=True, float32=True) for key, img in images.items()}
        item['gt_path'] = gt_path
        item['lq_path'] = lq_path if lq_path is not None else gt_path
        return item

    def __len__(self):
        return len(self.samples)
