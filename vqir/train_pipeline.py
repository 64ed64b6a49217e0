"""The training loop: basicsr's pipeline and parts, made safe for CPU runs, resume and DDP.

It follows ``basicsr.train.train_pipeline`` step by step (same options, folders, loggers and
messages), and differs where basicsr 1.4.2 breaks or loses work:
- resume maps storage to the CPU (not ``cuda``), finds ``experiments/`` from the project root
  whatever the working directory, restores RNG states and continues mid-epoch with the very
  batches an uninterrupted run would have drawn; it removes the temporaries of checkpoint
  writes that a crash interrupted and forgets the logged rows of iterations after its state;
- a run stopped by non-finite losses exits with a clear message and keeps its last checkpoint;
- a tqdm bar (``logger.pbar``) and a CSV of the logged losses for plotting curves.
"""
import csv
import io
import datetime
import math
import os
import time
from os import path as osp

import torch
from basicsr.data import build_dataloader, build_dataset
from basicsr.data.data_sampler import EnlargedSampler
from basicsr.data.prefetch_dataloader import CPUPrefetcher, CUDAPrefetcher
from basicsr.models import build_model
from basicsr.utils import (AvgTimer, MessageLogger, get_env_info, get_time_str, init_tb_logger,
                           mkdir_and_rename, scandir)
from tqdm import tqdm

from vqir.models.base_model import NonFiniteLossError
from vqir.utils.allocator import keep_freed_memory
from vqir.utils.atomic_file import atomic_write_bytes
from vqir.utils.checkpoint import CheckpointError, load_checkpoint
from vqir.utils.entry_point import run_pipeline
from vqir.utils.options import (OptionsError, apply_process_options, check_weight_files, copy_opt_file, dict2str,
                                parse_options)
from vqir.utils.run_logger import init_run_logger
from vqir.utils.wandb_run import ScalarLoggers, init_wandb_run


class ResumableSampler(EnlargedSampler):
    """basicsr's EnlargedSampler that can start an epoch part-way (after a resume)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_epoch(self, epoch, start_index=0):
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index


def find_resume_state(opt):
    """Path of the newest training state under the experiment folder, or the configured one."""
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        if osp.isdir(state_dir):
            iters = []
            for name in scandir(state_dir, suffix='.state'):
                stem = name[:-len('.state')]
                if stem.isdigit():
                    iters.append(int(stem))
            if iters:
                return osp.join(state_dir, f'{max(iters)}.state')
        return None
    return opt['path'].get('resume_state')


def load_resume_state(opt):
    path = find_resume_state(opt)
    if path is None:
        return None
    state = load_checkpoint(path)  # untrusted input like any checkpoint: weights_only, clear errors
    if not isinstance(state, dict) or 'iter' not in state or 'optimizers' not in state:
        raise CheckpointError(f'{path}: not a vqir training state')
    opt['path']['resume_state'] = path
    # Networks are restored from the checkpoints written with this state (before it, so they exist).
    models_dir = opt['path']['models']
    ignored = opt['path'].get('ignore_resume_networks') or []
    for label in state.get('networks', []):
        name = label[len('net_'):] if label.startswith('net_') else label
        if f'network_{name}' in ignored:
            continue
        opt['path'][f'pretrain_network_{name}'] = osp.join(models_dir, f'{label}_{state["iter"]}.pth')
        opt['path'][f'strict_load_{name}'] = True
        opt['path'][f'param_key_{name}'] = 'params'
    return state


def init_tb_logger_if_asked(opt):
    if opt['logger'].get('use_tb_logger') and 'debug' not in opt['name'] and opt['rank'] == 0:
        return init_tb_logger(log_dir=osp.join(opt['root_path'], 'tb_logger', opt['name']))
    return None


def build_datasets(opt, opt_file):
    """The dataset of every phase, built before the run creates its folders: a dataset option
    that is wrong (unknown key, missing folder) is an OptionsError naming the file and the phase."""
    datasets = {}
    for phase, dataset_opt in opt['datasets'].items():
        try:
            datasets[phase] = build_dataset(dataset_opt)
        except (ValueError, FileNotFoundError) as err:
            raise OptionsError(f'{opt_file}: datasets:{phase}: {err}') from None
        if phase == 'train':
            ratio = dataset_opt.get('dataset_enlarge_ratio', 1)
            per_process = len(ResumableSampler(datasets[phase], opt['world_size'], opt['rank'], ratio))
            # basicsr's loader: one batch per GPU of the process (DataParallel: num_gpu of them in one)
            batch = dataset_opt['batch_size_per_gpu'] * (1 if opt['dist'] or not opt['num_gpu'] else opt['num_gpu'])
            if per_process < batch:  # the train loader drops incomplete batches
                raise OptionsError(
                    f'{opt_file}: datasets:train: {len(datasets[phase])} images x enlarge ratio {ratio} is fewer than '
                    f'one batch of {batch} per process; lower batch_size_per_gpu or raise dataset_enlarge_ratio')
    return datasets


def create_train_val_dataloaders(opt, logger, datasets):
    train_loader = train_sampler = None
    val_loaders = []
    for phase, dataset_opt in opt['datasets'].items():
        if phase == 'train':
            ratio = dataset_opt.get('dataset_enlarge_ratio', 1)
            train_set = datasets[phase]
            train_sampler = ResumableSampler(train_set, opt['world_size'], opt['rank'], ratio)
            train_loader = build_dataloader(train_set, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'],
                                            sampler=train_sampler, seed=opt['manual_seed'])
            iters_per_epoch = len(train_loader)  # > 0: build_datasets checked it
            total_iters = int(opt['train']['total_iter'])
            logger.info('Training statistics:'
                        f'\n\tNumber of train images: {len(train_set)}'
                        f'\n\tDataset enlarge ratio: {ratio}'
                        f'\n\tBatch size per process: {dataset_opt["batch_size_per_gpu"]}'
                        f'\n\tWorld size: {opt["world_size"]}'
                        f'\n\tIterations per epoch: {iters_per_epoch}'
                        f'\n\tTotal epochs: {math.ceil(total_iters / iters_per_epoch)}; iters: {total_iters}.')
        else:
            val_set = datasets[phase]
            val_loaders.append(build_dataloader(val_set, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'],
                                                sampler=None, seed=opt['manual_seed']))
            logger.info(f'Number of val images in {dataset_opt["name"]}: {len(val_set)}')
    return train_loader, train_sampler, val_loaders, iters_per_epoch, total_iters


class LossCSV:
    """Logged training values, one row per print, for curves without TensorBoard."""

    def __init__(self, path, enabled):
        self.path, self.enabled, self.columns = path, enabled, None

    def __call__(self, log_vars):
        if not self.enabled:
            return
        values = {k: v for k, v in log_vars.items() if isinstance(v, (int, float)) and k != 'epoch'}
        if set(values) <= {'iter'}:  # a skipped step logs no values: a gap, not the previous step's
            return
        if self.columns is None:
            self.columns = list(values)
            if not osp.exists(self.path):
                with open(self.path, 'w', newline='', encoding='utf-8') as f:
                    csv.writer(f).writerow(self.columns)
        with open(self.path, 'a', newline='', encoding='utf-8') as f:
            csv.writer(f).writerow([values.get(c, '') for c in self.columns])

    def drop_rows_after(self, last_iter):
        """On resume: forget the rows of iterations after the training state (a run that was
        stopped logged them; the resumed run logs them again)."""
        if not self.enabled or not osp.exists(self.path):
            return
        with open(self.path, newline='', encoding='utf-8') as f:
            rows = list(csv.reader(f))
        if not rows or 'iter' not in rows[0]:
            return
        col = rows[0].index('iter')
        kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and r[col].isdigit() and int(r[col]) <= last_iter]
        if len(kept) < len(rows):
            table = io.StringIO(newline='')
            csv.writer(table).writerows(kept)
            atomic_write_bytes(self.path, table.getvalue().encode('utf-8'))


def remove_interrupted_writes(opt, logger):
    """Remove what checkpoint writes stopped by a crash left: hidden ``.<name>.<random>.tmp``
    files beside the checkpoints (see ``vqir.utils.checkpoint``; they are never read)."""
    removed = []
    for key in ('models', 'training_states'):
        folder = opt['path'][key]
        names = os.listdir(folder) if osp.isdir(folder) else []
        for name in sorted(n for n in names if n.startswith('.') and n.endswith('.tmp')):
            os.remove(osp.join(folder, name))
            removed.append(name)
    if removed:
        logger.info(f'Removed {len(removed)} temporary files of interrupted checkpoint writes: {", ".join(removed)}')


def train_pipeline(root_path, argv=None):
    opt, args = parse_options(root_path, is_train=True, argv=argv)
    apply_process_options(opt)

    resume_state = load_resume_state(opt)
    check_weight_files(opt, args.opt)
    datasets = build_datasets(opt, args.opt)
    if resume_state is None and opt['rank'] == 0:
        mkdir_and_rename(opt['path']['experiments_root'])
        for key in ('models', 'training_states', 'visualization'):
            os.makedirs(opt['path'][key], exist_ok=True)
        if opt['logger'].get('use_tb_logger') and 'debug' not in opt['name']:
            mkdir_and_rename(osp.join(opt['root_path'], 'tb_logger', opt['name']))
    copy_opt_file(args.opt, opt['path']['experiments_root'])

    log_file = osp.join(opt['path']['log'], f"train_{opt['name']}_{get_time_str()}.log")
    logger = init_run_logger(log_file)
    logger.info(get_env_info())
    logger.info(dict2str(opt))
    tb_logger = init_tb_logger_if_asked(opt)
    wandb_run = init_wandb_run(opt, resume_state)
    if wandb_run is not None:
        tb_logger = ScalarLoggers(tb_logger, wandb_run)

    train_loader, train_sampler, val_loaders, iters_per_epoch, total_iters = create_train_val_dataloaders(opt, logger, datasets)
    model = build_model(opt)
    model.wandb_id = wandb_run.id if wandb_run is not None else (resume_state or {}).get('wandb_id')
    current_iter = 0
    if resume_state:
        model.resume_training(resume_state)
        current_iter = resume_state['iter']
        logger.info(f"Resuming training from {opt['path']['resume_state']} (iter {current_iter}).")
        if opt['rank'] == 0:
            remove_interrupted_writes(opt, logger)
    start_epoch, start_offset = divmod(current_iter, iters_per_epoch)

    msg_logger = MessageLogger(opt, current_iter, tb_logger)
    loss_csv = LossCSV(osp.join(opt['path']['experiments_root'], 'train_log.csv'), opt['rank'] == 0)
    if resume_state:
        loss_csv.drop_rows_after(current_iter)
    prefetch_mode = opt['datasets']['train'].get('prefetch_mode')
    if prefetch_mode == 'cuda' and torch.cuda.is_available():
        prefetcher = CUDAPrefetcher(train_loader, opt)
    else:
        prefetcher = CPUPrefetcher(train_loader)
    val_opt = opt.get('val')
    show_pbar = opt['logger'].get('pbar', False) and opt['rank'] == 0
    pbar = tqdm(total=total_iters, initial=current_iter, unit='it', desc=opt['name'], dynamic_ncols=True,
                disable=not show_pbar)

    validates = val_opt is not None and bool(val_loaders)

    def validate(at_iter):
        for val_loader in val_loaders:
            model.validation(val_loader, at_iter, tb_logger, val_opt.get('save_img', False))

    if validates and val_opt.get('keep_best') and current_iter == 0:
        # the starting network is a candidate too (e.g. a stage 2 that starts as stage 1's image)
        validate(current_iter)
    logger.info(f'Start training from epoch: {start_epoch}, iter: {current_iter}')
    data_timer, iter_timer = AvgTimer(), AvgTimer()
    start_time = time.time()
    batch_size = opt['datasets']['train']['batch_size_per_gpu']
    try:
        epoch = start_epoch
        while current_iter < total_iters:
            offset = start_offset if epoch == start_epoch else 0
            train_sampler.set_epoch(epoch, offset * batch_size)
            prefetcher.reset()
            if offset and resume_state and 'rng' in resume_state:
                # the new loader iterator drew its seed from torch's global generator, which an
                # uninterrupted run does not do mid-epoch: the saved state holds from here
                torch.set_rng_state(resume_state['rng']['torch'])
            train_data = prefetcher.next()
            while train_data is not None and current_iter < total_iters:
                data_timer.record()
                current_iter += 1
                model.update_learning_rate(current_iter, warmup_iter=opt['train'].get('warmup_iter', -1))
                model.feed_data(train_data)
                model.optimize_parameters(current_iter)
                iter_timer.record()
                if current_iter == 1:
                    msg_logger.reset_start_time()
                log = model.get_current_log()
                if show_pbar:
                    pbar.update(1)
                    pbar.set_postfix({k: f'{v:.4f}' for k, v in list(log.items())[:4]})
                if current_iter % opt['logger']['print_freq'] == 0:
                    log_vars = {'epoch': epoch, 'iter': current_iter, 'lrs': model.get_current_learning_rate(),
                                'time': iter_timer.get_avg_time(), 'data_time': data_timer.get_avg_time()}
                    log_vars.update(log)
                    msg_logger(log_vars)
                    loss_csv(dict(iter=current_iter, **log))
                # validation first: the state saved at this iteration then holds its best metric values
                if validates and current_iter % val_opt['val_freq'] == 0:
                    validate(current_iter)
                if current_iter % opt['logger']['save_checkpoint_freq'] == 0:
                    logger.info('Saving models and training states.')
                    model.save(epoch, current_iter)
                data_timer.start()
                iter_timer.start()
                train_data = prefetcher.next()
            epoch += 1
    except NonFiniteLossError as err:
        logger.error(str(err))
        pbar.close()
        if tb_logger:
            tb_logger.close()
        raise SystemExit(f'error: {err}') from None
    pbar.close()

    consumed = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    logger.info(f'End of training. Time consumed: {consumed}')
    logger.info('Save the latest model.')
    model.save(epoch=-1, current_iter=-1)
    if validates and current_iter % val_opt['val_freq'] != 0:  # else just done
        validate(current_iter)
    if tb_logger:
        tb_logger.close()
    return model


def main(argv=None):
    keep_freed_memory()  # every iteration allocates the same blocks again: keep them (vqir.utils.allocator)
    run_pipeline(train_pipeline, argv)
