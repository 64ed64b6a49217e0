"""The built-in demo: VQIR end to end on the photos that ship with scikit-image (`make demo`).

Steps (each a normal command you can also run by hand):
  1. python scripts/data_preparation/export_demo_data.py          -> datasets/demo/{train,val,select}
  2. the VQGAN prior: pretrained/demo_vqgan_f16.safetensors, made by
     python vqir/train.py -opt options/train/demo_stage0_vqgan.yml     (only with --train-prior)
  3. python vqir/train.py -opt options/train/demo_stage1_ifrm_x16.yml  (IFRM on that VQGAN)
  4. python vqir/train.py -opt options/train/demo_stage2_msrm_x16.yml  (MSRM on stage 1; keeps the state
     that reconstructs the select photos best, untrained included, as net_g_best.pth)
  5. python vqir/test.py  -opt options/test/demo_x16.yml               (held-out photos)
  6. the report in results/demo/: bicubic, the VQGAN alone, stage 1 and VQIR side by side, in a
     table and in figures, and the training curves.

Options: --train-prior (train the VQGAN prior too, as pretrained/README.md describes: about
1.5 hours on 2 CPU cores), --quick (a few iterations per stage; what the
end-to-end test runs), --skip-training (report on existing experiments), --seed N (the seed of
stages 1 and 2), --root DIR (where experiments/ and results/ go).
"""
import argparse
import os
import subprocess
import sys
import time
from os import path as osp

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PRIOR_STAGE = ('stage 0: VQGAN prior', 'options/train/demo_stage0_vqgan.yml', 'demo_stage0_vqgan')
STAGES = [
    ('stage 1: IFRM x16', 'options/train/demo_stage1_ifrm_x16.yml', 'demo_stage1_ifrm_x16'),
    ('stage 2: MSRM x16', 'options/train/demo_stage2_msrm_x16.yml', 'demo_stage2_msrm_x16'),
]
TEST_OPT = 'options/test/demo_x16.yml'
PRETRAINED_PRIOR = 'pretrained/demo_vqgan_f16.safetensors'
TRAINED_PRIOR = 'experiments/demo_stage0_vqgan/models/net_g_latest.pth'
QUICK_ITERS = 4
DEMO_SPLITS = ('train', 'val', 'select')  # what export_demo_data.py writes


def run(cmd, root):
    print('\n$ ' + ' '.join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, check=True)


def root_overrides(root):
    return [f'path:root={root}'] if root != ROOT else []


def force_yml(overrides):
    return ['--force_yml'] + overrides if overrides else []


def train_all(root, quick, train_prior, seed):
    stages = ([PRIOR_STAGE] if train_prior else []) + STAGES
    for title, opt_file, name in stages:
        print(f'\n==== {title} ({opt_file}) ====', flush=True)
        overrides = root_overrides(root)
        if name != PRIOR_STAGE[2] and seed is not None:
            overrides.append(f'manual_seed={seed}')
        if train_prior and name == STAGES[0][2]:
            overrides.append(f'path:pretrain_network_vqgan={TRAINED_PRIOR}')  # resolved under the root
        if quick:
            overrides += [f'train:total_iter={QUICK_ITERS}', f'val:val_freq={QUICK_ITERS}',
                          f'logger:save_checkpoint_freq={QUICK_ITERS}', 'logger:print_freq=1']
        run([osp.join('vqir', 'train.py'), '-opt', opt_file] + force_yml(overrides), root)


def test_all(root):
    print(f'\n==== test on held-out photos ({TEST_OPT}) ====', flush=True)
    run([osp.join('vqir', 'test.py'), '-opt', TEST_OPT] + force_yml(root_overrides(root)), root)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train-prior', action='store_true',
                        help=f'train the VQGAN prior (stage 0) instead of using {PRETRAINED_PRIOR}')
    parser.add_argument('--quick', action='store_true', help=f'{QUICK_ITERS} iterations per stage (smoke test)')
    parser.add_argument('--seed', type=int, help='random seed of stages 1 and 2 (default: their options\' manual_seed)')
    parser.add_argument('--skip-training', action='store_true', help='only test and report')
    parser.add_argument('--root', default=ROOT, help='folder that receives experiments/, results/, tb_logger/')
    args = parser.parse_args(argv)
    root = osp.abspath(args.root)
    start = time.time()

    if not all(osp.isdir(osp.join(ROOT, 'datasets', 'demo', split)) for split in DEMO_SPLITS):
        run([osp.join('scripts', 'data_preparation', 'export_demo_data.py')], root)
    prior = osp.join(root, TRAINED_PRIOR) if args.train_prior else osp.join(ROOT, PRETRAINED_PRIOR)
    if not args.train_prior and not osp.isfile(prior):
        sys.exit(f'{prior}: the demo\'s VQGAN prior is missing; restore it (git checkout {PRETRAINED_PRIOR}) '
                 'or train one with --train-prior')
    if not args.skip_training:
        train_all(root, args.quick, args.train_prior, args.seed)
    test_all(root)

    from vqir.utils.allocator import use_huge_pages
    use_huge_pages()  # the report runs the networks here: before its first tensor, as vqir's entry points
    from demo_report import StageNetworks, write_demo_report
    from vqir.utils.options import load_options_file
    stage1_weights = osp.join(root, 'experiments', STAGES[0][2], 'models', 'net_g_latest.pth')
    networks = StageNetworks(osp.join(ROOT, PRIOR_STAGE[1]), prior, osp.join(ROOT, STAGES[0][1]), stage1_weights)
    names = ([PRIOR_STAGE[2]] if args.train_prior else []) + [name for _, _, name in STAGES]
    stage2_val = load_options_file(osp.join(ROOT, STAGES[1][1])).get('val') or {}
    selection = None
    if stage2_val.get('keep_best'):
        keep_best = stage2_val['keep_best']
        better = stage2_val['metrics'][keep_best['metric']].get('better', 'higher')
        selection = (STAGES[1][2], dict(keep_best, better=better))
    report = write_demo_report(root, osp.join(ROOT, 'datasets', 'demo', 'val'), networks, names,
                               stage2_selection=selection)
    minutes = (time.time() - start) / 60
    print(f'\nDemo finished in {minutes:.1f} min. Results in {osp.join(root, "results", "demo")}:')
    for line in report:
        print('  ' + line)


if __name__ == '__main__':
    main()
