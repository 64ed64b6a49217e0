"""Each case in a child process of its own, so that its peak memory is its own: the parent starts
it and waits for its result, the child sets up the allocator, runs the case and sends the result
back."""
import multiprocessing as mp
import time
import traceback

import torch

from vqir.utils.allocator import keep_freed_memory

from benchmarking.case_list import TRAINING_OPS
from benchmarking.cases import run_conv_case, run_precision_case, run_rescale_case, run_train_case
from benchmarking.machine import load_average
from benchmarking.memory import PeakMemory, is_out_of_memory, limit_address_space
from benchmarking.reference_cases import run_ref_forward_case, run_ref_memory_case, run_ref_train_case


RUNNERS = {
    'conv': run_conv_case,
    'down': run_rescale_case,
    'up': run_rescale_case,
    'roundtrip': run_rescale_case,
    'train1': run_train_case,
    'train2': run_train_case,
    'ref_forward': run_ref_forward_case,
    'ref_train': run_ref_train_case,
    'ref_memory': run_ref_memory_case,
    'precision': run_precision_case,
}


def child_main(spec, conn):
    """Entry point of a case's child process: runs the case, sends back a result dict."""
    device = torch.device(spec['device'])
    torch.set_num_threads(spec['threads'])
    torch.manual_seed(spec['seed'])
    result = {'load_before': load_average()}
    if spec['malloc'] == 'vqir' or (spec['malloc'] == 'entry' and spec['op'] in TRAINING_OPS):
        result['malloc_kept_freed_memory'] = keep_freed_memory()
    else:
        result['malloc_kept_freed_memory'] = False
    try:
        if device.type == 'cpu':
            result['address_space_limit'] = limit_address_space(spec['memory_limit'])
        peak = PeakMemory(device)
        result.update(RUNNERS[spec['op']](spec, device, peak))
        result['status'] = 'ok'
    except Exception as err:  # reported per case; the other cases go on
        result['status'] = 'out of memory' if is_out_of_memory(err) else 'error'
        result['error'] = f'{type(err).__name__}: {err}'.splitlines()[0][:300]
        result['traceback'] = traceback.format_exc(limit=8)
    result['load_after'] = load_average()
    try:
        conn.send(result)
    finally:
        conn.close()


def run_case(spec, timeout):
    """Run one case in a child process (fork on CPU when available, spawn otherwise)."""
    if spec.get('skip_reason'):
        return {'status': 'skipped', 'error': spec['skip_reason']}
    use_fork = spec['device'] == 'cpu' and 'fork' in mp.get_all_start_methods()
    ctx = mp.get_context('fork' if use_fork else 'spawn')
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child_main, args=(spec, sender), daemon=True)
    start = time.perf_counter()
    proc.start()
    sender.close()
    result = None
    if receiver.poll(timeout):
        try:
            result = receiver.recv()
        except EOFError:
            result = None
    else:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        result = {'status': 'timeout', 'error': f'no result within {timeout} s'}
    proc.join()
    if result is None:
        code = proc.exitcode
        hint = ' (killed: out of memory?)' if code in (-9, 137) else ''
        result = {'status': 'crashed', 'error': f'child exited with code {code}{hint}'}
    result['case_wall_s'] = time.perf_counter() - start
    return result
