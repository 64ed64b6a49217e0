"""The built-in demo: VQIR end to end on the photos that ship with scikit-image (`make demo`).

Steps (each a normal command you can also run by hand):
  1. python scripts/export_demo_data.py                       -> datasets/demo/{train,val}
  2. python vqir/train.py -opt options/train/demo_stage0_vqgan.yml     (a small f16 VQGAN)
  3. python vqir/train.py -opt options/train/demo_stage1_ifrm_x16.yml  (IFRM on that VQGAN)
  4. python vqir/train.py -opt options/train/demo_stage2_msrm_x16.yml  (MSRM on stage 1)
  5. python vqir/test.py  -opt options/test/demo_x16.yml               (held-out photos)
  6. the report in results/demo/: VQIR vs bicubic table, side-by-side figures, training curves.

Options: --quick (a few iterations per stage; what the end-to-end test runs), --skip-training
(report on existing experiments), --root DIR (where experiments/ and results/ go).
"""
import argparse
import os
import subprocess
import sys
import time
from os import path as osp

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STAGES = [
    ('stage 0: VQGAN', 'options/train/demo_stage0_vqgan.yml', 'demo_stage0_vqgan'),
    ('stage 1: IFRM x16', 'options/train/demo_stage1_ifrm_x16.yml', 'demo_stage1_ifrm_x16'),
    ('stage 2: MSRM x16', 'options/train/demo_stage2_msrm_x16.yml', 'demo_stage2_msrm_x16'),
]
TEST_OPT = 'options/test/demo_x16.yml'
QUICK_ITERS = 4


def run(cmd, root):
    print('\n$ ' + ' '.join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, check=True)


def root_args(root):
    return ['--force_yml', f'path:root={root}'] if root != ROOT else []


def train_all(root, quick):
    for title, opt_file, name in STAGES:
        print(f'\n==== {title} ({opt_file}) ====', flush=True)
        extra = root_args(root)
        if quick:
            extra = (extra or ['--force_yml']) + [f'train:total_iter={QUICK_ITERS}', f'val:val_freq={QUICK_ITERS}',
                                                  f'logger:save_checkpoint_freq={QUICK_ITERS}', 'logger:print_freq=1']
        run([osp.join('vqir', 'train.py'), '-opt', opt_file] + extra, root)


def test_all(root):
    print(f'\n==== test on held-out photos ({TEST_OPT}) ====', flush=True)
    run([osp.join('vqir', 'test.py'), '-opt', TEST_OPT] + root_args(root), root)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help=f'{QUICK_ITERS} iterations per stage (smoke test)')
    parser.add_argument('--skip-training', action='store_true', help='only test and report')
    parser.add_argument('--root', default=ROOT, help='folder that receives experiments/, results/, tb_logger/')
    args = parser.parse_args(argv)
    root = osp.abspath(args.root)
    start = time.time()

    if not osp.isdir(osp.join(ROOT, 'datasets', 'demo', 'train')):
        run([osp.join('scripts', 'export_demo_data.py')], root)
    if not args.skip_training:
        train_all(root, args.quick)
    test_all(root)

    from vqir.utils.demo_report import write_demo_report
    report = write_demo_report(root, [name for _, _, name in STAGES])
    minutes = (time.time() - start) / 60
    print(f'\nDemo finished in {minutes:.1f} min. Results in {osp.join(root, "results", "demo")}:')
    for line in report:
        print('  ' + line)


if __name__ == '__main__':
    main()
