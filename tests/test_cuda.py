"""On a CUDA device (skipped without one): the Rescaler's GPU paths in float32 and fp16, the 8-bit
LR there, and a stage-1 training step with fp16 loss scaling."""
import os

import pytest
import torch
from basicsr.models import build_model

from vqir.inference import Rescaler
from vqir.utils.options import parse_options

from helpers import ROOT, fixed_batch, on_8bit_grid, photo, photo_folders, tiny_vqir, train_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.fixture
def full_fp32_convolutions():
    """cuDNN may use TF32 for float32 convolutions (PyTorch's default); these tests compare with the CPU."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def test_cuda_rescaling_matches_the_cpu(full_fp32_convolutions):
    net = tiny_vqir()
    hr = photo(96, 80)
    lr_cpu, out_cpu = Rescaler(net, device='cpu', tile=0).roundtrip(hr)
    rescaler = Rescaler(net, device='cuda', tile=0)
    lr_cuda = rescaler.downscale(hr.cuda())
    assert lr_cuda.is_cuda and on_8bit_grid(lr_cuda)
    # the same LR but where rounding meets a value half-way between two levels
    assert (lr_cuda.cpu() != lr_cpu).float().mean() <= 0.01
    assert (lr_cuda.cpu() - lr_cpu).abs().max() <= 1 / 255 + 1e-6
    # from the same LR file, the same reconstruction
    out_cuda = rescaler.upscale(lr_cpu.cuda(), out_size=(96, 80))
    for key, value in out_cpu.items():
        assert (out_cuda[key].cpu() - value).abs().mean() < 1e-4, key


def test_fp16_rescaling_stays_close_to_float32():
    net = tiny_vqir()
    hr = photo(96, 80).cuda()
    lr32, out32 = Rescaler(net, device='cuda', tile=0).roundtrip(hr)
    lr16, out16 = Rescaler(net, device='cuda', tile=0, half=True).roundtrip(hr)
    assert lr16.dtype == torch.float32 and on_8bit_grid(lr16)
    assert (lr16 != lr32).float().mean() <= 0.05
    assert out16['Level_1'].dtype == torch.float32 and torch.isfinite(out16['Level_1']).all()
    assert (out16['Level_1'] - out32['Level_1']).abs().mean() < 0.02


def test_fp16_training_on_cuda(tmp_path):
    train, val = photo_folders(str(tmp_path / 'photos'))
    argv = ['-opt', os.path.join(ROOT, 'options', 'train', 'stage1_ifrm_tiny.yml'), '--force_yml',
            f'datasets:train:dataroot_gt={train}', f'datasets:val:dataroot_gt={val}', 'num_gpu=1',
            'train:mixed_precision=fp16']
    opt, _ = parse_options(str(tmp_path), is_train=True, argv=argv)
    torch.manual_seed(0)
    model = build_model(opt)
    assert model.device.type == 'cuda'
    logs = [log for log in train_steps(model, fixed_batch(opt), 10) if log]  # overflowed steps log nothing
    assert len(logs) >= 5 and logs[-1]['l_feature'] < logs[0]['l_feature']
    assert model.grad_scalers['icrm'].get_scale() > 0
    assert all(p.is_cuda and p.dtype == torch.float32 for p in model.bare_net.parameters())
