"""The test loop: every test set of an options file through the model's validation.

Writes ``results/<name>/<test set>/<output>/<image>.png``, ``results/<name>/metrics_<test set>.csv``
(per image and mean; set-level metrics such as FID in the mean row) and ``results/<name>/options.yml``
(the options as resolved for the run), and prints a table of the means of all test sets at the end.
"""
from os import path as osp

from basicsr.data import build_dataloader
from basicsr.models import build_model
from basicsr.utils import get_env_info, get_time_str, mkdir_and_rename

from vqir.models.validation import format_summary
from vqir.train_pipeline import build_datasets
from vqir.utils.entry_point import run_pipeline
from vqir.utils.options import (apply_process_options, check_weight_files, dict2str, parse_options,
                                save_resolved_options)
from vqir.utils.run_logger import init_run_logger


def test_pipeline(root_path, argv=None):
    opt, args = parse_options(root_path, is_train=False, argv=argv)
    apply_process_options(opt)
    # what can be wrong with the files a run reads is found before it creates its results folder
    check_weight_files(opt, args.opt)
    datasets = build_datasets(opt, args.opt)
    if opt['rank'] == 0:
        mkdir_and_rename(opt['path']['results_root'])
    save_resolved_options(opt, opt['path']['results_root'])
    log_file = osp.join(opt['path']['log'], f"test_{opt['name']}_{get_time_str()}.log")
    logger = init_run_logger(log_file)
    logger.info(get_env_info())
    logger.info(dict2str(opt))

    test_loaders = []
    for phase, dataset_opt in sorted(opt['datasets'].items()):
        test_set = datasets[phase]
        test_loaders.append(build_dataloader(test_set, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'],
                                             sampler=None, seed=opt['manual_seed']))
        logger.info(f"Number of test images in {dataset_opt['name']}: {len(test_set)}")

    model = build_model(opt)
    save_img = (opt.get('val') or {}).get('save_img', True)
    summary = []
    for test_loader in test_loaders:
        name = test_loader.dataset.opt['name']
        logger.info(f'Testing {name}...')
        model.validation(test_loader, current_iter=opt['name'], tb_logger=None, save_img=save_img)
        result = getattr(model, 'last_validation', None)
        if result is not None:
            summary.append((name, result['mean'], len(result['rows'])))
    if summary:
        logger.info(format_summary(summary))
    logger.info(f"Results in {opt['path']['results_root']}")
    return model


def main(argv=None):
    run_pipeline(test_pipeline, argv)
