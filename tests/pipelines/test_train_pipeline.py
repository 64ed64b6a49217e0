"""End-to-end tests of the training and test loops (``vqir.train_pipeline`` / ``vqir.test_pipeline``)
on the tiny stage-0 config: what a run writes, auto-resume from another directory, ``--debug``, the
experiments and results roots, the best metric values, W&B logging. (A resumed run following the
uninterrupted one: test_resume.py; option errors: tests/utils/test_options.py.)"""
import glob
import os
import sys
from os import path as osp

import cv2
import pytest
import torch

from vqir.test_pipeline import test_pipeline as run_test_pipeline
from vqir.train_pipeline import train_pipeline
from vqir.utils.options import OptionsError

from helpers import ROOT, STAGE0_NAME as NAME, STAGE0_TRAIN_YML as TRAIN_YML, read_csv
from helpers import stage0_train_argv as train_argv

TEST_YML = osp.join(ROOT, 'options', 'test', 'test_stage0_vqgan_tiny.yml')


def read_text(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dirs):
    """One short run: 6 iterations, checkpoints and validation every 3, discriminator from iteration 4."""
    root = str(tmp_path_factory.mktemp('run'))
    train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=6', 'logger:print_freq=1',
                                         'logger:save_checkpoint_freq=3', 'val:val_freq=3',
                                         'train:vqgan_loss_opt:disc_start=4'))
    return root


def test_train_run_writes_checkpoints_states_logs_and_metrics(trained):
    exp = osp.join(trained, 'experiments', NAME)
    for it in (3, 6, 'latest'):
        for label in ('net_g', 'net_d'):
            weights = torch.load(osp.join(exp, 'models', f'{label}_{it}.pth'), weights_only=True)
            assert list(weights) == ['params']
    for it in (3, 6):
        state = torch.load(osp.join(exp, 'training_states', f'{it}.state'), weights_only=True)
        assert state['iter'] == it and len(state['optimizers']) == 2 and state['networks'] == ['net_g', 'net_d']
    assert sorted(os.listdir(osp.join(exp, 'training_states'))) == ['3.state', '6.state']

    logs = glob.glob(osp.join(exp, f'train_{NAME}_*.log'))
    assert len(logs) == 1, f'no log file in {exp}'
    log_text = read_text(logs[0])
    assert 'End of training' in log_text and 'codebook_perplexity' in log_text
    assert osp.isfile(osp.join(exp, osp.basename(TRAIN_YML)))  # the options, as run

    rows = read_csv(osp.join(exp, 'train_log.csv'))
    assert [int(r['iter']) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert list(rows[0]) == ['iter', 'l_rec', 'l_codebook', 'l_g_gan', 'd_weight', 'l_d', 'perplexity']
    assert all(float(r['l_d']) == 0 for r in rows[:3]) and all(float(r['l_d']) > 0 for r in rows[3:])

    for it in (3, 6):
        metrics = read_csv(osp.join(exp, 'visualization', f'metrics_demo_val_{it}.csv'))
        assert [r['image'] for r in metrics] == ['cat', 'coffee', 'mean']
        assert set(metrics[0]) == {'image', 'psnr', 'ssim', 'codebook_perplexity', 'codebook_used_fraction'}
        assert 0 < float(metrics[-1]['codebook_used_fraction']) <= 1
        rec = cv2.imread(osp.join(exp, 'visualization', 'demo_val', 'rec', f'cat_{it}.png'))
        assert rec.shape == (64, 80, 3)


def test_auto_resume_from_another_directory(trained, data_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may depend on the working directory
    exp = osp.join(trained, 'experiments', NAME)
    model = train_pipeline(trained, argv=train_argv(data_dirs, 'train:total_iter=8', 'logger:print_freq=1',
                                                    'logger:save_checkpoint_freq=4', 'val:val_freq=100',
                                                    'train:vqgan_loss_opt:disc_start=4', extra=['--auto_resume']))
    assert model.opt['path']['resume_state'] == osp.join(exp, 'training_states', '6.state')
    rows = read_csv(osp.join(exp, 'train_log.csv'))
    assert [int(r['iter']) for r in rows] == list(range(1, 9))  # continued at 7, appended to the same CSV
    assert osp.isfile(osp.join(exp, 'models', 'net_g_8.pth'))
    assert not os.listdir(tmp_path)  # nothing written to the working directory
    # the resumed run has a log file of its own; the first run's log is left as it was
    logs = {p: read_text(p) for p in glob.glob(osp.join(exp, f'train_{NAME}_*.log'))}
    resumed = [p for p, text in logs.items() if 'Resuming training from' in text]
    first = [p for p, text in logs.items() if 'Start training from epoch: 0, iter: 0' in text]
    assert len(logs) == 2 and len(resumed) == 1 and len(first) == 1 and resumed != first, sorted(logs)


def test_debug_prefixes_the_experiment_name(tmp_path, data_dirs):
    train_pipeline(str(tmp_path), argv=train_argv(data_dirs, 'train:total_iter=2', extra=['--debug']))
    assert os.listdir(tmp_path / 'experiments') == [f'debug_{NAME}']
    assert osp.isfile(tmp_path / 'experiments' / f'debug_{NAME}' / 'models' / 'net_g_latest.pth')


def test_cpu_threads_sets_the_runs_torch_threads(tmp_path, data_dirs, val_dir, trained, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, 'set_num_threads', calls.append)  # the test process keeps its own threads
    train_pipeline(str(tmp_path), argv=train_argv(data_dirs, 'train:total_iter=1', 'cpu_threads=1'))
    weights = osp.join(trained, 'experiments', NAME, 'models', 'net_g_6.pth')
    run_test_pipeline(str(tmp_path), argv=['-opt', TEST_YML, '--force_yml', f'datasets:test_1:dataroot_gt={val_dir}',
                                           f'path:pretrain_network_g={weights}', 'cpu_threads=3'])
    train_pipeline(str(tmp_path / 'default'), argv=train_argv(data_dirs, 'train:total_iter=1'))
    assert calls == [1, 3]  # without the option torch keeps its default


def test_test_pipeline_writes_reconstructions_and_metrics(trained, val_dir, tmp_path):
    weights = osp.join(trained, 'experiments', NAME, 'models', 'net_g_6.pth')
    root = str(tmp_path)
    model = run_test_pipeline(root, argv=['-opt', TEST_YML, '--force_yml', f'datasets:test_1:dataroot_gt={val_dir}',
                                          f'path:pretrain_network_g={weights}'])
    results = osp.join(root, 'results', model.opt['name'])
    for name, shape in (('cat', (64, 80, 3)), ('coffee', (72, 56, 3))):
        assert cv2.imread(osp.join(results, 'demo_val', 'rec', f'{name}.png')).shape == shape
    logs = glob.glob(osp.join(results, f'test_{model.opt["name"]}_*.log'))
    assert len(logs) == 1 and 'Mean metrics per test set' in read_text(logs[0]), f'no log file in {results}'
    metrics = read_csv(osp.join(results, 'metrics_demo_val.csv'))
    assert [r['image'] for r in metrics] == ['cat', 'coffee', 'mean']
    assert list(metrics[0]) == ['image', 'psnr', 'ssim', 'codebook_perplexity', 'codebook_used_fraction']
    # the test loop and the training run's validation saw the same network on the same images
    trained_metrics = read_csv(osp.join(trained, 'experiments', NAME, 'visualization', 'metrics_demo_val_6.csv'))
    assert [r['psnr'] for r in metrics] == [r['psnr'] for r in trained_metrics]


def test_experiments_and_results_roots_are_honoured(tmp_path, data_dirs, trained, val_dir):
    """path:experiments_root / path:results_root (BasicSR's keys) place a run's folders; auto-resume
    finds its states there. Relative to the root, like the default experiments/<name>."""
    root = str(tmp_path / 'root')
    common = ['train:total_iter=2', 'logger:save_checkpoint_freq=2', 'val=~', 'path:experiments_root=runs/a']
    train_pipeline(root, argv=train_argv(data_dirs, *common))
    exp = osp.join(root, 'runs', 'a')
    assert sorted(os.listdir(osp.join(exp, 'models'))) == ['net_d_2.pth', 'net_d_latest.pth', 'net_g_2.pth',
                                                           'net_g_latest.pth']
    assert os.listdir(osp.join(exp, 'training_states')) == ['2.state'] and not osp.exists(osp.join(root, 'experiments'))
    model = train_pipeline(root, argv=train_argv(data_dirs, *common[1:], 'train:total_iter=4', extra=['--auto_resume']))
    assert model.opt['path']['resume_state'] == osp.join(exp, 'training_states', '2.state')

    results = str(tmp_path / 'elsewhere' / 'results')  # absolute
    weights = osp.join(trained, 'experiments', NAME, 'models', 'net_g_6.pth')
    run_test_pipeline(root, argv=['-opt', TEST_YML, '--force_yml', f'datasets:test_1:dataroot_gt={val_dir}',
                                  f'path:pretrain_network_g={weights}', f'path:results_root={results}'])
    assert osp.isfile(osp.join(results, 'metrics_demo_val.csv')) and not osp.exists(osp.join(root, 'results'))


def test_best_metric_values_are_logged_and_survive_a_resume(tmp_path, data_dirs):
    root = str(tmp_path / 'root')
    common = ['logger:save_checkpoint_freq=3', 'val:val_freq=3', 'train:vqgan_loss_opt:disc_start=100',
              'val:metrics:colour={type: calculate_ciede2000, output: rec, target: gt, better: lower}']
    train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=3', *common))
    model = train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=6', *common, extra=['--auto_resume']))
    exp = osp.join(root, 'experiments', NAME)
    means = {it: read_csv(osp.join(exp, 'visualization', f'metrics_demo_val_{it}.csv'))[-1] for it in (3, 6)}
    state = torch.load(osp.join(exp, 'training_states', '6.state'), weights_only=False)
    for metric, pick in (('psnr', max), ('colour', min)):
        best_iter = pick((3, 6), key=lambda it: float(means[it][metric]))
        best = state['best_metrics'][f'demo_val/{metric}']
        assert best['iter'] == best_iter and f'{best["value"]:.4f}' == means[best_iter][metric], (metric, best)
        assert model.best_metrics[f'demo_val/{metric}'] == best
    log = read_text(glob.glob(osp.join(exp, f'train_{NAME}_*.log'))[-1])
    assert 'Best demo_val/colour (lower is better): ' in log and 'Best demo_val/psnr (higher is better): ' in log
    with pytest.raises(OptionsError, match=r"option val:metrics:colour:better must be 'higher' \(default\) or 'lower'"):
        train_pipeline(str(tmp_path / 'other'), argv=train_argv(
            data_dirs, 'val:metrics:colour={type: calculate_ciede2000, output: rec, target: gt, better: less}'))


# with this seed the best of iterations 0, 2 and 4 is: psnr 4, colour 4 (after a worse 2), inverted psnr 2,
# inverted colour 0 (the untrained network)
@pytest.mark.parametrize('metric, better', [('psnr', 'higher'), ('colour', 'lower'), ('psnr', 'lower'),
                                            ('colour', 'higher')])
def test_keep_best_saves_the_networks_of_the_best_validation(tmp_path, data_dirs, metric, better):
    """val.keep_best: a new run also validates before its first step, and <net>_best.pth holds the networks
    of the validation with that set's best mean (the earliest of equal ones), across a resume."""
    root = str(tmp_path / 'root')
    pick = max if better == 'higher' else min
    common = ['logger:save_checkpoint_freq=2', 'val:val_freq=2', 'train:vqgan_loss_opt:disc_start=100',
              f'val:metrics:psnr:better={"higher" if metric == "colour" else better}',
              f'val:metrics:colour={{type: calculate_ciede2000, output: rec, target: gt, better: '
              f'{better if metric == "colour" else "lower"}}}',
              f'val:keep_best={{dataset: demo_val, metric: {metric}}}']
    train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=2', *common))
    train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=4', *common, extra=['--auto_resume']))
    exp = osp.join(root, 'experiments', NAME)
    means = {it: float(read_csv(osp.join(exp, 'visualization', f'metrics_demo_val_{it}.csv'))[-1][metric])
             for it in (0, 2, 4)}
    best_iter = pick((0, 2, 4), key=lambda it: means[it])  # the first of equal ones
    models = osp.join(exp, 'models')
    best = torch.load(osp.join(models, 'net_g_best.pth'), weights_only=True)['params']
    saved = {it: torch.load(osp.join(models, f'net_g_{it}.pth'), weights_only=True)['params'] for it in (2, 4)}
    for it, params in saved.items():
        same = all(torch.equal(best[k], v) for k, v in params.items())
        assert same == (it == best_iter), (it, best_iter, means)  # best_iter 0: equal to neither
    log = read_text(sorted(glob.glob(osp.join(exp, f'train_{NAME}_*.log')))[0])  # the first run's log
    assert f'Best demo_val/{metric} ' in log and '@ iter 0' in log  # validated before training


class _FakeWandb:
    """The part of the wandb module a run uses: init(...) -> run with id, log(), finish()."""

    def __init__(self):
        self.inits, self.logged = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs['id'] or 'run-one'  # W&B makes one up for a new run

            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.logged.append(('finished', {}))

        return Run()


def test_wandb_run_is_started_and_resumed_with_the_same_id(tmp_path, data_dirs, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    monkeypatch.setattr('importlib.util.find_spec', lambda name, *a: object() if name == 'wandb' else None)
    root = str(tmp_path / 'root')
    common = ['logger:use_tb_logger=true', 'logger:wandb={project: vqir-tests}', 'logger:print_freq=1',
              'logger:save_checkpoint_freq=2', 'val=~']
    train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=2', *common))
    train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=3', *common, extra=['--auto_resume']))
    first, second = fake.inits
    assert (first['id'], first['resume'], second['id'], second['resume']) == (None, 'never', 'run-one', 'allow')
    assert first['project'] == 'vqir-tests' and first['name'] == NAME
    assert first['dir'] == osp.join(root, 'experiments', NAME)
    steps = [step for step, values in fake.logged if 'losses/l_rec' in values]
    assert steps == [1, 2, 3] and fake.logged[-1][0] == 'finished'
    state = torch.load(osp.join(root, 'experiments', NAME, 'training_states', '2.state'), weights_only=False)
    assert state['wandb_id'] == 'run-one'


def test_wandb_offline_run_when_installed(tmp_path, data_dirs, monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    root = str(tmp_path / 'root')
    common = ['logger:use_tb_logger=true', 'logger:wandb={project: vqir-tests}', 'logger:save_checkpoint_freq=2',
              'val=~']
    train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=2', *common))
    train_pipeline(root, argv=train_argv(data_dirs, 'train:total_iter=3', *common, extra=['--auto_resume']))
    run_id = torch.load(osp.join(root, 'experiments', NAME, 'training_states', '2.state'), weights_only=False)['wandb_id']
    runs = glob.glob(osp.join(root, 'experiments', NAME, 'wandb', 'offline-run-*'))
    assert len(runs) == 2 and all(r.endswith(f'-{run_id}') for r in runs)  # both sessions: one run id
