"""The demo's report: what each stage of VQIR adds, against bicubic rescaling, in numbers and pictures.

For every held-out photo, four reconstructions at the same scale:

    bicubic       MATLAB-bicubic down to 1/s, rounded to 8 bits, bicubic back up
    VQGAN alone   the stage-0 prior's own reconstruction (encoder, codebook, decoder; no LR at all)
    stage 1       VQGAN + IFRM: through the 8-bit LR, the VQGAN decoder's image
    VQIR          stage 2: the MSRM's Level_1, from the images ``test.py`` saved

each measured from 8-bit images by the same code: PSNR and SSIM on Y (the field's convention,
blind to colour), RGB-PSNR and the mean CIEDE2000 colour difference, border ``s`` pixels. The
8-bit LRs of stages 1 and 2 are compared with the bicubic LR (RGB-PSNR, CIEDE2000; no border).
The mean is over natural photos; synthetic charts (the colour wheel) get rows of their own.

Writes ``comparison.md`` / ``comparison.csv``, ``figures/<photo>.png`` (HR | LR | bicubic |
VQGAN alone | stage 1 | VQIR) and ``curves/<stage>.png`` under ``results/<name>/``.
"""
import csv
import math
import os
from os import path as osp

import cv2
import numpy as np
import torch

import vqir  # noqa: F401  (first: it adapts basicsr to current torchvision and registers the components)
from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import img2tensor, tensor2img
from basicsr.utils.matlab_functions import imresize

from vqir.inference import Rescaler
from vqir.metrics.ciede2000_metric import calculate_ciede2000
from vqir.utils.atomic_file import atomic_write, atomic_write_bytes
from vqir.utils.checkpoint import load_weights
from vqir.utils.image_io import read_image
from vqir.utils.img_util import from_network, pad_to_multiple, to_network
from vqir.utils.options import load_options_file

SYNTHETIC = ('colorwheel', )  # charts reported on their own rows, outside the mean
METHODS = (('bicubic', 'bicubic'), ('vqgan', 'VQGAN alone'), ('stage1', 'stage 1'), ('vqir', 'VQIR'))
IMAGE_METRICS = (('y_psnr', 'Y-PSNR'), ('ssim', 'SSIM'), ('rgb_psnr', 'RGB-PSNR'), ('ciede2000', 'CIEDE2000'))
LR_METRICS = (('lr_rgb_psnr', 'LR RGB-PSNR'), ('lr_ciede2000', 'LR CIEDE2000'))
# The targets for the demo, against bicubic at the same scale (means over natural photos).
MAX_COLOUR_ERROR_RATIO = 1.3
MAX_Y_PSNR_LOSS_DB = 1.5
MIN_LR_RGB_PSNR_DB = 26.0


def bicubic_rescale(hr_bgr, scale):
    """(uint8 LR, uint8 reconstruction of the HR's size) of bicubic down/up rescaling.

    Sides that do not divide by the scale are reflect-padded, as the network's input is."""
    h, w = hr_bgr.shape[:2]
    padded = pad_to_multiple(hr_bgr.astype(np.float64) / 255., scale)
    lr = np.clip(np.round(imresize(padded, 1 / scale) * 255), 0, 255).astype(np.uint8)
    up = imresize(lr.astype(np.float64) / 255., scale)
    up = np.clip(np.round(up * 255), 0, 255).astype(np.uint8)
    return lr, up[:h, :w]


def _read(path):
    """An 8-bit image the demo wrote, as uint8 (H, W, 3) BGR (the report's arrays)."""
    rgb, _ = read_image(path)
    return np.round(rgb[:, :, ::-1] * 255).astype(np.uint8)


def _to_uint8_bgr(tensor):
    """(1, 3, H, W) RGB in [0, 1] -> uint8 (H, W, 3) BGR, rounded as saved images are."""
    return tensor2img(tensor[0], rgb2bgr=True, min_max=(0, 1))


def _to_tensor(img_bgr):
    """uint8 (H, W, 3) BGR -> (1, 3, H, W) RGB float32 in [0, 1]."""
    return img2tensor(img_bgr / 255., bgr2rgb=True, float32=True)[None]


def _network_options(opt_file):
    return dict(load_options_file(opt_file)['network_g'])


class StageNetworks:
    """The demo's stage-0 VQGAN and stage-1 network, for the reconstructions ``test.py`` does not make."""

    def __init__(self, vqgan_opt_file, vqgan_weights, stage1_opt_file, stage1_weights):
        self.vqgan = build_network(_network_options(vqgan_opt_file)).eval()
        load_weights(self.vqgan, vqgan_weights, strict=True)
        self.stage1 = Rescaler.from_weights(stage1_weights, opt=_network_options(stage1_opt_file), device='cpu')

    @torch.inference_mode()
    def vqgan_alone(self, hr_bgr):
        x = to_network(_to_tensor(hr_bgr))
        h, w = x.shape[-2:]
        quant, _, _ = self.vqgan.encode(pad_to_multiple(x, self.vqgan.downsample_factor))
        rec = self.vqgan.decode(quant)[..., :h, :w]
        return _to_uint8_bgr(from_network(rec))

    def stage1_roundtrip(self, hr_bgr):
        lr, outs = self.stage1.roundtrip(_to_tensor(hr_bgr))
        return _to_uint8_bgr(lr), _to_uint8_bgr(outs['SR'])


def measure(img, hr, border):
    return dict(y_psnr=calculate_psnr(img, hr, crop_border=border, test_y_channel=True),
                ssim=calculate_ssim(img, hr, crop_border=border, test_y_channel=True),
                rgb_psnr=calculate_psnr(img, hr, crop_border=border, test_y_channel=False),
                ciede2000=calculate_ciede2000(img, hr, crop_border=border))


def measure_lr(lr, bicubic_lr):
    return dict(lr_rgb_psnr=calculate_psnr(lr, bicubic_lr, crop_border=0, test_y_channel=False),
                lr_ciede2000=calculate_ciede2000(lr, bicubic_lr, crop_border=0))


def compare(hr_dir, result_dir, scale, networks, final_output='Level_1'):
    """One entry per photo: its images and, per method, the metrics of :func:`measure` (+ LR metrics)."""
    photos = []
    for file_name in sorted(f for f in os.listdir(hr_dir) if f.lower().endswith('.png')):
        name = osp.splitext(file_name)[0]
        hr = _read(osp.join(hr_dir, file_name))
        bic_lr, bic_up = bicubic_rescale(hr, scale)
        stage1_lr, stage1_up = networks.stage1_roundtrip(hr)
        images = dict(hr=hr, lr=_read(osp.join(result_dir, 'LR', f'{name}.png')), bicubic=bic_up,
                      vqgan=networks.vqgan_alone(hr), stage1=stage1_up,
                      vqir=_read(osp.join(result_dir, final_output, f'{name}.png')))
        metrics = {method: measure(images[method], hr, scale) for method, _ in METHODS}
        # what the prior's codes hold of the LR: its own reconstruction, bicubic-downscaled like the HR
        metrics['vqgan'].update(measure_lr(bicubic_rescale(images['vqgan'], scale)[0], bic_lr))
        metrics['stage1'].update(measure_lr(stage1_lr, bic_lr))
        metrics['vqir'].update(measure_lr(images['lr'], bic_lr))
        photos.append(dict(name=name, size=f'{hr.shape[1]}x{hr.shape[0]}', synthetic=name in SYNTHETIC,
                           images=images, metrics=metrics))
    return photos


def mean_metrics(photos):
    """{method: {metric: mean over the natural photos}}."""
    natural = [p for p in photos if not p['synthetic']]
    return {method: {key: float(np.mean([p['metrics'][method][key] for p in natural]))
                     for key in natural[0]['metrics'][method]} for method, _ in METHODS} if natural else {}


def targets(means):
    """[(description, measured, met)] of the demo's targets, from the means over natural photos."""
    if not means:
        return []
    bic, vqir, stage1 = means['bicubic'], means['vqir'], means['stage1']
    ratio = vqir['ciede2000'] / bic['ciede2000']
    loss = bic['y_psnr'] - vqir['y_psnr']
    return [
        (f'colour error (CIEDE2000) at most {MAX_COLOUR_ERROR_RATIO}x bicubic\'s',
         f'{ratio:.2f}x: VQIR {vqir["ciede2000"]:.2f}, bicubic {bic["ciede2000"]:.2f}', ratio <= MAX_COLOUR_ERROR_RATIO),
        (f'Y-PSNR at least bicubic\'s minus {MAX_Y_PSNR_LOSS_DB} dB',
         f'VQIR {vqir["y_psnr"]:.2f} dB, bicubic {bic["y_psnr"]:.2f} dB', loss <= MAX_Y_PSNR_LOSS_DB),
        (f'LR within {MIN_LR_RGB_PSNR_DB:.0f} dB RGB-PSNR of the bicubic LR', f'{vqir["lr_rgb_psnr"]:.2f} dB',
         vqir['lr_rgb_psnr'] >= MIN_LR_RGB_PSNR_DB),
        ('stage 2 not worse than stage 1 (Y-PSNR)',
         f'VQIR {vqir["y_psnr"]:.2f} dB, stage 1 {stage1["y_psnr"]:.2f} dB', vqir['y_psnr'] >= stage1['y_psnr']),
    ]


def _fmt(value):
    if value is None:
        return ''
    return 'inf' if math.isinf(value) else f'{value:.2f}' if abs(value) > 1 else f'{value:.4f}'


def _table_rows(photos, means):
    """(image, size, method title, metrics) rows: natural photos, their mean, then synthetic charts."""
    rows = [(p['name'], p['size'], title, p['metrics'][method])
            for p in photos if not p['synthetic'] for method, title in METHODS]
    rows += [('**mean**', 'natural photos', title, means[method]) for method, title in METHODS] if means else []
    for p in photos:
        if p['synthetic']:
            rows += [(f'{p["name"]} (chart)', p['size'], title, p['metrics'][method]) for method, title in METHODS]
    return rows


def kept_state(experiment_dir, keep_best):
    """Which validated state a ``val.keep_best`` run kept: (its iteration, {iteration: mean of the metric}),
    from the run's metrics CSVs (``visualization/metrics_<set>_<iter>.csv``); None when there are none.
    ``keep_best``: the option's ``dataset`` and ``metric``, and ``better`` (the metric's, ``higher`` by default)."""
    dataset, metric = keep_best['dataset'], keep_best['metric']
    vis = osp.join(experiment_dir, 'visualization')
    prefix = f'metrics_{dataset}_'
    means = {}
    for file_name in os.listdir(vis) if osp.isdir(vis) else []:
        if file_name.startswith(prefix) and file_name.endswith('.csv') and file_name[len(prefix):-4].isdigit():
            with open(osp.join(vis, file_name), newline='', encoding='utf-8') as f:
                rows = [r for r in csv.DictReader(f) if r['image'] == 'mean']
            if rows and rows[0].get(metric):
                means[int(file_name[len(prefix):-4])] = float(rows[0][metric])
    if not means:
        return None
    order = sorted(means)  # the earliest of equal values, as the run keeps it
    pick = min if keep_best.get('better', 'higher') == 'lower' else max
    return pick(order, key=lambda it: means[it]), {it: means[it] for it in order}


def kept_state_line(experiment_dir, keep_best):
    """One line for the report: which stage-2 state the VQIR rows show, and why."""
    kept = kept_state(experiment_dir, keep_best)
    if kept is None:
        return None
    best_iter, means = kept
    scores = ', '.join(f'{it}: {value:.2f}' for it, value in means.items())
    untrained = ' (the untrained MSRM, i.e. stage 1\'s image)' if best_iter == 0 else ''
    return (f'VQIR is stage 2 at iteration {best_iter}{untrained}: of the states validated, the one with the best '
            f'{keep_best["metric"]} on {keep_best["dataset"]}, photos neither trained on nor reported here '
            f'(val.keep_best; iteration: mean {scores}).')


def write_table(photos, means, scale, out_dir, extra_lines=()):
    keys = [k for k, _ in IMAGE_METRICS + LR_METRICS]
    header = ['image', 'size', f'x{scale}'] + [t for _, t in IMAGE_METRICS + LR_METRICS]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    rows = _table_rows(photos, means)
    for image, size, title, metrics in rows:
        lines.append('| ' + ' | '.join([image, size, title] + [_fmt(metrics.get(k)) for k in keys]) + ' |')
    target_lines = [f'- {"met" if met else "NOT met"}: {what} ({value})'
                    for what, value, met in targets(means)]
    note = (f'Y-PSNR and SSIM on Y, RGB-PSNR and mean CIEDE2000 on RGB, border {scale} px; LR columns: the 8-bit LR '
            'against the MATLAB-bicubic LR (no border); on the VQGAN row, its reconstruction bicubic-downscaled '
            'the same way: how close an LR made from the prior\'s codes can come. The mean is over the natural '
            'photos; charts have rows of their own. Figures measured by this demo run (small networks trained on '
            'six photos), not the paper\'s.')
    text = '\n'.join(lines) + '\n\n' + note + '\n' + ''.join(f'\n{line}\n' for line in extra_lines) + (
        '\nTargets:\n' + '\n'.join(target_lines) + '\n' if target_lines else '')
    atomic_write_bytes(osp.join(out_dir, 'comparison.md'), text.encode('utf-8'))

    def write_csv(tmp_path):
        with open(tmp_path, 'w', newline='', encoding='utf-8') as f:
            writer = csv.writer(f)
            writer.writerow(['image', 'size', 'method'] + keys)
            for image, size, title, metrics in rows:
                writer.writerow([image.strip('*'), size, title] + [_fmt_csv(metrics.get(k)) for k in keys])

    atomic_write(osp.join(out_dir, 'comparison.csv'), write_csv)
    return text


def _fmt_csv(value):
    return '' if value is None else f'{value:.4f}'


def _pyplot(out_dir):
    """matplotlib's pyplot on the file-only backend, with ``out_dir`` created."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    return plt


def _save_figure(plt, fig, path, dpi):
    """Lay out, write atomically as PNG and close ``fig``; returns ``path``."""
    fig.tight_layout()
    atomic_write(path, lambda tmp_path: fig.savefig(tmp_path, dpi=dpi, format='png'))
    plt.close(fig)
    return path


def write_figures(photos, scale, out_dir):
    plt = _pyplot(out_dir)
    paths = []
    for p in photos:
        images, metrics = p['images'], p['metrics']
        hr, lr = images['hr'], images['lr']
        h, w = hr.shape[:2]
        lr_big = cv2.resize(lr, (lr.shape[1] * scale, lr.shape[0] * scale), interpolation=cv2.INTER_NEAREST)[:h, :w]
        panels = [(hr, 'HR (original)'), (lr_big, f'VQIR\'s 8-bit LR {lr.shape[1]}x{lr.shape[0]} (nearest x{scale})')]
        for method, title in METHODS:
            m = metrics[method]
            panels.append((images[method], f'{title}: {m["y_psnr"]:.2f} dB Y, ΔE {m["ciede2000"]:.1f}'))
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2 * h / w + 0.5))
        for ax, (img, title) in zip(axes, panels):
            ax.imshow(img[..., ::-1])
            ax.set_title(title, fontsize=8)
            ax.axis('off')
        paths.append(_save_figure(plt, fig, osp.join(out_dir, f'{p["name"]}.png'), dpi=80))
    return paths


def write_curves(root, experiment_names, out_dir):
    plt = _pyplot(out_dir)
    paths = []
    for name in experiment_names:
        log_path = osp.join(root, 'experiments', name, 'train_log.csv')
        if not osp.isfile(log_path):
            continue
        with open(log_path, newline='', encoding='utf-8') as f:
            data = list(csv.DictReader(f))
        if not data:
            continue
        iters = [float(d['iter']) for d in data]
        series = [k for k in data[0] if k not in ('iter', 'time', 'data_time') and not k.startswith('lr')]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in series:
            values = [float(d[key]) if d.get(key) not in (None, '') else np.nan for d in data]
            ax.plot(iters, values, label=key)
        ax.set_xlabel('iteration')
        ax.set_yscale('symlog', linthresh=1e-3)
        ax.set_title(name)
        ax.legend(fontsize=8)
        paths.append(_save_figure(plt, fig, osp.join(out_dir, f'{name}.png'), dpi=90))
    return paths


def write_demo_report(root, hr_dir, networks, experiment_names, name='demo', dataset='demo_val', scale=16,
                      stage2_selection=None):
    """Writes the table, figures and curves under ``<root>/results/<name>/``; returns lines to print.

    ``networks``: a :class:`StageNetworks` (the stage-0 and stage-1 networks of this run).
    ``stage2_selection``: (stage 2's experiment name, its ``val.keep_best``): the table says which state it kept."""
    out_dir = osp.join(root, 'results', name)
    photos = compare(hr_dir, osp.join(out_dir, dataset), scale, networks)
    means = mean_metrics(photos)
    extra = []
    if stage2_selection is not None:
        line = kept_state_line(osp.join(root, 'experiments', stage2_selection[0]), stage2_selection[1])
        extra = [line] if line else []
    table = write_table(photos, means, scale, out_dir, extra)
    figures = write_figures(photos, scale, osp.join(out_dir, 'figures'))
    curves = write_curves(root, experiment_names, osp.join(out_dir, 'curves'))
    print('\n' + table)
    return [f'table:   {osp.join(out_dir, "comparison.md")} (and .csv)',
            f'figures: {osp.join(out_dir, "figures")} ({len(figures)} images: HR | LR | bicubic | VQGAN alone | '
            'stage 1 | VQIR)',
            f'curves:  {osp.join(out_dir, "curves")} ({len(curves)} stages)',
            f'images:  {osp.join(out_dir, dataset)} (LR, Level_1, Level_2, Level_4 per photo)']
