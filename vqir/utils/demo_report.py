"""The demo's report: VQIR against bicubic rescaling, side-by-side figures, training curves.

Both methods are measured by the same code from the saved 8-bit PNGs: PSNR/SSIM on the Y channel
with a border of ``scale`` pixels, LR fidelity as PSNR of the 8-bit LR against the bicubic LR.
The bicubic baseline is MATLAB-bicubic down to 1/scale, rounded to 8 bits, and bicubic back up;
sides that do not divide by the scale are reflect-padded as the network's input is.
"""
import csv
import glob
import math
import os
from os import path as osp

import cv2
import numpy as np
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils.matlab_functions import imresize


def _pad_to_multiple(img, multiple):
    h, w = img.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    mode = cv2.BORDER_REFLECT_101 if ph < h and pw < w else cv2.BORDER_REPLICATE
    return cv2.copyMakeBorder(img, 0, ph, 0, pw, mode) if ph or pw else img


def bicubic_rescale(hr_bgr, scale):
    """(uint8 LR, uint8 reconstruction of the HR's size) of bicubic down/up rescaling."""
    h, w = hr_bgr.shape[:2]
    padded = _pad_to_multiple(hr_bgr, scale).astype(np.float64) / 255.
    lr = np.clip(np.round(imresize(padded, 1 / scale) * 255), 0, 255).astype(np.uint8)
    up = imresize(lr.astype(np.float64) / 255., scale)
    up = np.clip(np.round(up * 255), 0, 255).astype(np.uint8)
    return lr, up[:h, :w]


def _read(path):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f'{path}: missing or unreadable image')
    return img


def _psnr_ssim(img, ref, border):
    return (calculate_psnr(img, ref, crop_border=border, test_y_channel=True),
            calculate_ssim(img, ref, crop_border=border, test_y_channel=True))


def compare_with_bicubic(hr_dir, result_dir, scale, final_output='Level_1'):
    """One row per image: PSNR/SSIM of bicubic and VQIR, and the LR PSNR of VQIR's 8-bit LR."""
    rows = []
    for hr_path in sorted(glob.glob(osp.join(hr_dir, '*.png'))):
        name = osp.splitext(osp.basename(hr_path))[0]
        hr = _read(hr_path)
        bic_lr, bic_up = bicubic_rescale(hr, scale)
        vqir_up = _read(osp.join(result_dir, final_output, f'{name}.png'))
        vqir_lr = _read(osp.join(result_dir, 'LR', f'{name}.png'))
        bic_psnr, bic_ssim = _psnr_ssim(bic_up, hr, scale)
        vq_psnr, vq_ssim = _psnr_ssim(vqir_up, hr, scale)
        lr_psnr = calculate_psnr(vqir_lr, bic_lr, crop_border=0, test_y_channel=True)
        rows.append(dict(image=name, size=f'{hr.shape[1]}x{hr.shape[0]}', bicubic_psnr=bic_psnr,
                         bicubic_ssim=bic_ssim, vqir_psnr=vq_psnr, vqir_ssim=vq_ssim, vqir_lr_psnr=lr_psnr,
                         images=(hr, vqir_lr, bic_up, vqir_up)))
    return rows


def _fmt(v):
    return 'inf' if math.isinf(v) else f'{v:.2f}' if v > 1 else f'{v:.4f}'


def write_table(rows, scale, out_dir):
    keys = ['bicubic_psnr', 'bicubic_ssim', 'vqir_psnr', 'vqir_ssim', 'vqir_lr_psnr']
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    header = ['image', 'size', f'bicubic x{scale} PSNR', 'bicubic SSIM', 'VQIR PSNR', 'VQIR SSIM', 'VQIR LR PSNR']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows + [dict(image='**mean**', size='', **means)]:
        lines.append('| ' + ' | '.join([r['image'], r['size']] + [_fmt(r[k]) for k in keys]) + ' |')
    note = (f'PSNR/SSIM on Y, border {scale} px; LR PSNR = the 8-bit LR against the MATLAB-bicubic LR. '
            'Figures measured by this demo run (small networks trained for minutes), not the paper\'s.')
    with open(osp.join(out_dir, 'comparison.md'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n\n' + note + '\n')
    with open(osp.join(out_dir, 'comparison.csv'), 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'size'] + keys)
        for r in rows:
            writer.writerow([r['image'], r['size']] + [f'{r[k]:.4f}' for k in keys])
        writer.writerow(['mean', ''] + [f'{means[k]:.4f}' for k in keys])
    return '\n'.join(lines)


def write_figures(rows, scale, out_dir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for r in rows:
        hr, lr, bic, rec = r['images']
        h, w = hr.shape[:2]
        lr_big = cv2.resize(lr, (lr.shape[1] * scale, lr.shape[0] * scale), interpolation=cv2.INTER_NEAREST)[:h, :w]
        panels = [(hr, 'HR (original)'), (lr_big, f'8-bit LR {lr.shape[1]}x{lr.shape[0]} (nearest x{scale})'),
                  (bic, f'bicubic x{scale}: {r["bicubic_psnr"]:.2f} dB'), (rec, f'VQIR x{scale}: {r["vqir_psnr"]:.2f} dB')]
        fig, axes = plt.subplots(1, 4, figsize=(16, 4.4 * h / w + 0.6))
        for ax, (img, title) in zip(axes, panels):
            ax.imshow(img[..., ::-1])
            ax.set_title(title, fontsize=10)
            ax.axis('off')
        fig.tight_layout()
        path = osp.join(out_dir, f'{r["image"]}.png')
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def write_curves(root, experiment_names, out_dir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
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
        fig.tight_layout()
        path = osp.join(out_dir, f'{name}.png')
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_demo_report(root, experiment_names, name='demo', dataset='demo_val', scale=16,
                      hr_dir=None):
    """Writes the table, figures and curves under ``results/<name>/``; returns lines to print."""
    out_dir = osp.join(root, 'results', name)
    hr_dir = hr_dir or osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'datasets', 'demo',
                                'val')
    rows = compare_with_bicubic(hr_dir, osp.join(out_dir, dataset), scale)
    table = write_table(rows, scale, out_dir)
    figures = write_figures(rows, scale, osp.join(out_dir, 'figures'))
    curves = write_curves(root, experiment_names, osp.join(out_dir, 'curves'))
    print('\n' + table)
    return [f'table:   {osp.join(out_dir, "comparison.md")} (and .csv)',
            f'figures: {osp.join(out_dir, "figures")} ({len(figures)} images: HR | LR | bicubic | VQIR)',
            f'curves:  {osp.join(out_dir, "curves")} ({len(curves)} stages)',
            f'images:  {osp.join(out_dir, dataset)} (LR, Level_1, Level_2, Level_4 per photo)']
