"""One validation loop for every vqir model (a mixin of ``VQIRBaseModel``), and its reports.

For each image of a validation (or test) set: ``feed_data``, ``test``, the metrics of
``val.metrics`` (each names the output and the target it compares, both among the model's
``image_names``), the images of ``val.outputs`` written atomically. Then a metrics CSV per set
(one row per image, then the mean), a printed table, TensorBoard scalars and, in training, the
best value of each metric so far. Set-level metrics (FID, KID, codebook usage) appear in the mean
row only. ``format_summary`` is test.py's closing table over all test sets.
"""
import csv
import io
import math
import os
from collections import OrderedDict
from os import path as osp

import numpy as np
from basicsr.metrics import calculate_metric
from basicsr.utils import get_root_logger, tensor2img
from tqdm import tqdm

from vqir.metrics.fid_metric import InceptionFeatureSets
from vqir.utils.atomic_file import atomic_write_bytes
from vqir.utils.dist import barrier
from vqir.utils.hub_weights import WeightsNotFoundError
from vqir.utils.image_io import write_image
from vqir.utils.options import METRIC_ROUTING_KEYS, check_metric_weights

__all__ = ['ValidationMixin', 'format_metrics_table', 'format_summary']


class ValidationMixin:
    """basicsr's ``validation`` entry points (``dist_validation`` / ``nondist_validation``) for a model
    with ``feed_data``, ``test``, ``self.output`` and ``self.targets`` (image name -> (1,3,h,w) RGB in
    [0,1]), ``self.opt`` and ``self.best_metrics``."""

    default_saved_outputs = ()

    def get_current_visuals(self):
        """Every output and target of the last ``test()`` as (1,3,h,w) RGB tensors in [0,1] on the CPU."""
        visuals = OrderedDict()
        for key, value in self.output.items():
            visuals[key] = value.detach().float().cpu()
        for key, value in getattr(self, 'targets', {}).items():
            visuals[key] = value.detach().float().cpu()
        return visuals

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        # Validation runs on rank 0 only, on the bare network, so no collective op can hang.
        if self.opt['rank'] == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)
        barrier()

    def saved_outputs(self):
        """Names of the outputs written as images (subclasses list theirs)."""
        return list(self.opt.get('val', {}).get('outputs') or self.default_saved_outputs)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        val_opt = self.opt.get('val') or {}
        dataset_name = dataloader.dataset.opt['name']
        metric_opts = OrderedDict(val_opt.get('metrics') or {})
        is_test = not self.opt['is_train']
        rows = []
        max_images = val_opt.get('max_images')
        pbar = tqdm(total=len(dataloader) if not max_images else min(max_images, len(dataloader)), unit='image',
                    desc=f'{dataset_name}', dynamic_ncols=True, disable=not val_opt.get('pbar', True))
        metric_opts = self._drop_unavailable_metrics(metric_opts)
        set_metrics = InceptionFeatureSets(metric_opts)  # FID, KID: one value over the whole set
        metric_opts = OrderedDict((k, v) for k, v in metric_opts.items() if k not in set_metrics.entries)
        warned = set()  # metrics already warned about
        self.begin_validation()
        for idx, val_data in enumerate(dataloader):
            if max_images and idx >= max_images:
                break
            img_name = osp.splitext(osp.basename(val_data.get('gt_path', val_data.get('lq_path'))[0]))[0]
            self.feed_data(val_data)
            self.test()
            visuals = self.get_current_visuals()
            images = {key: tensor2img(value.clone()) for key, value in visuals.items()}
            row = OrderedDict(image=img_name)
            for metric_name, opt_ in metric_opts.items():
                output_key, target_key = opt_['output'], opt_['target']
                if output_key not in images or target_key not in images:
                    if metric_name not in warned:  # e.g. a test set without the target images
                        warned.add(metric_name)
                        get_root_logger().warning(f'metric {metric_name} skipped for {dataset_name}: image {img_name} '
                                                  f'has no {output_key if output_key not in images else target_key}')
                    continue
                arguments = {k: v for k, v in opt_.items() if k not in METRIC_ROUTING_KEYS}  # with its type
                value = float(calculate_metric({'img': images[output_key], 'img2': images[target_key]}, arguments))
                if not math.isfinite(value) and metric_name not in warned:
                    warned.add(metric_name)  # e.g. SSIM of a 4x4 LR: no 11x11 window fits
                    height, width = images[output_key].shape[:2]
                    get_root_logger().warning(
                        f'metric {metric_name} is {value} for {dataset_name}/{img_name}: {output_key} is {width}x{height} '
                        f'pixels (crop border {arguments.get("crop_border", 0)}), maybe too small for the metric')
                row[metric_name] = value
            rows.append(row)
            set_metrics.add(images)
            if save_img:
                for key in self.saved_outputs():
                    if key not in images:
                        continue
                    if is_test:
                        save_path = osp.join(self.opt['path']['results_root'], dataset_name, key, f'{img_name}.png')
                    else:
                        save_path = osp.join(self.opt['path']['visualization'], dataset_name, key,
                                             f'{img_name}_{current_iter}.png')
                    write_image(save_path, visuals[key])  # atomic: an interrupted run leaves no partial file
            pbar.update(1)
            pbar.set_postfix_str(img_name)
        pbar.close()
        means = self._summarise_metrics(rows, OrderedDict(**set_metrics.compute(), **self.dataset_metrics()),
                                        dataset_name, current_iter, tb_logger)
        self.last_validation = {'dataset': dataset_name, 'rows': rows, 'mean': means}
        return means

    def begin_validation(self):
        """Called before the first image of a validation set (e.g. to reset set-level statistics)."""

    def dataset_metrics(self):
        """Set-level values measured over the whole validation set (name -> float), reported beside
        the means of the per-image metrics (CSV mean row, table, TensorBoard)."""
        return OrderedDict()

    @staticmethod
    def _drop_unavailable_metrics(metric_opts):
        """Metrics marked ``optional: true`` whose weights are not on this machine are skipped
        (with a warning naming the missing file); without ``optional`` the run stops at start."""
        kept = OrderedDict()
        for name, opt_ in metric_opts.items():
            try:
                check_metric_weights(opt_)
            except WeightsNotFoundError as err:
                if not opt_.get('optional', False):
                    raise
                get_root_logger().warning(f'metric {name} skipped: {err}')
                continue
            kept[name] = opt_
        return kept

    def _update_best_metrics(self, dataset_name, means, current_iter, logger):
        """Keep and log the best mean of every ``val:metrics`` entry (``better: higher`` by default,
        or ``lower``) and the iteration that reached it, as basicsr does. With ``val:keep_best``, a new
        best of that set's metric saves the networks as ``<net>_best.pth`` (a tie keeps the earlier)."""
        val_opt = self.opt.get('val') or {}
        keep_best = val_opt.get('keep_best') or {}
        for name, metric_opt in (val_opt.get('metrics') or {}).items():
            value = means.get(name)
            if value is None or not math.isfinite(value):
                continue
            key = f'{dataset_name}/{name}'
            best = self.best_metrics.get(key)
            lower = metric_opt.get('better', 'higher') == 'lower'
            improved = best is None or (value < best['value'] if lower else value > best['value'])
            if improved:
                best = self.best_metrics[key] = {'value': value, 'iter': current_iter}
            logger.info(f'Best {key} ({"lower" if lower else "higher"} is better): {best["value"]:.4f} '
                        f'@ iter {best["iter"]}')
            if improved and keep_best.get('dataset') == dataset_name and keep_best.get('metric') == name:
                self.save_best()
                logger.info(f'{key} {value:.4f} is the best so far: networks saved as <net>_best.pth')

    def _summarise_metrics(self, rows, set_metrics, dataset_name, current_iter, tb_logger):
        image_columns = [c for c in (rows[0].keys() if rows else []) if c != 'image']
        means = OrderedDict((c, float(np.mean([r[c] for r in rows if c in r]))) for c in image_columns)
        means.update(set_metrics)
        columns = list(means)
        if not columns:
            return means
        if self.opt['is_train']:
            out_dir = self.opt['path']['visualization']
            csv_path = osp.join(out_dir, f'metrics_{dataset_name}_{current_iter}.csv')
        else:
            out_dir = self.opt['path']['results_root']
            csv_path = osp.join(out_dir, f'metrics_{dataset_name}.csv')
        os.makedirs(out_dir, exist_ok=True)
        image_rows = rows if image_columns else []  # set-level values alone: only the mean row
        table = io.StringIO(newline='')
        writer = csv.writer(table)
        writer.writerow(['image'] + columns)
        for r in image_rows:
            writer.writerow([r['image']] + [f'{r[c]:.4f}' if c in r else '' for c in columns])
        writer.writerow(['mean'] + [f'{means[c]:.4f}' if math.isfinite(means[c]) else str(means[c])
                                    for c in columns])
        atomic_write_bytes(csv_path, table.getvalue().encode('utf-8'))
        logger = get_root_logger()
        logger.info(format_metrics_table(image_rows, columns, means, title=f'{dataset_name} @ {current_iter}'))
        logger.info(f'metrics written to {csv_path}')
        if self.opt['is_train']:
            self._update_best_metrics(dataset_name, means, current_iter, logger)
        if tb_logger is not None:
            for c, v in means.items():
                if math.isfinite(v):
                    tb_logger.add_scalar(f'metrics/{dataset_name}/{c}', v, current_iter)
        return means


def format_metrics_table(rows, columns, means, title=''):
    """A plain-text table: one row per image, then the mean."""
    name_w = max([len('image'), len('mean')] + [len(r['image']) for r in rows])
    col_w = [max(len(c), 9) for c in columns]
    line = '-' * (name_w + sum(w + 3 for w in col_w))
    out = [title, line, 'image'.ljust(name_w) + ''.join(' | ' + c.rjust(w) for c, w in zip(columns, col_w)), line]
    for r in rows:
        out.append(r['image'].ljust(name_w)
                   + ''.join(' | ' + (f'{r[c]:.4f}' if c in r else '').rjust(w) for c, w in zip(columns, col_w)))
    out.append(line)
    out.append('mean'.ljust(name_w) + ''.join(' | ' + f'{means[c]:.4f}'.rjust(w) for c, w in zip(columns, col_w)))
    return '\n'.join(out)


def format_summary(summary):
    """test.py's closing table: one row per test set (name, image count, the means of its metrics)."""
    columns = []
    for _, means, _ in summary:
        columns += [c for c in means if c not in columns]
    name_w = max(len('test set'), *(len(n) for n, _, _ in summary))
    header = 'test set'.ljust(name_w) + ' | images' + ''.join(f' | {c:>9}' for c in columns)
    lines = ['Mean metrics per test set', '-' * len(header), header, '-' * len(header)]
    for name, means, count in summary:
        cells = ''.join(f' | {means[c]:9.4f}' if c in means else f' | {"":>9}' for c in columns)
        lines.append(f'{name.ljust(name_w)} | {count:6d}{cells}')
    return '\n'.join(lines)
