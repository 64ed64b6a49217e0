"""scripts/model_conversion/check_weights.py: a downloaded file is recognised and compared with the released layout.

The released networks are too big for a test, so the script's two layouts (the official VQIR
configuration and taming's f16 VQGAN) are swapped for tiny ones; the files are written in the
formats the real ones come in (the authors' plain state_dict, taming's Lightning checkpoint with
its training-only loss.* entries, basicsr's {'params'})."""
import copy

import pytest
import torch
from basicsr.archs import build_network

from vqir.archs.vqgan_arch import VQGAN
from vqir.utils.checkpoint import save_state_dict

from helpers import load_script

TINY_VQIR = dict(type='VQIR', stage=2, ir_scale=16, in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2, 2, 2, 2],
                 num_res_blocks=1, double_z=False, z_channels=64, n_embed=64, embed_dim=64, attn_mult=[1, 1])
TINY_VQGAN = dict(ch=32, ch_mult=[1, 2, 2, 2, 2], num_res_blocks=1, z_channels=64, n_embed=64, embed_dim=64)


@pytest.fixture
def script(monkeypatch):
    module = load_script('model_conversion/check_weights')

    def tiny_official(ir_scale, stage=2):
        opt = dict(copy.deepcopy(TINY_VQIR), ir_scale=ir_scale, stage=stage)
        if stage == 1:
            del opt['attn_mult']
        return opt

    monkeypatch.setattr(module, 'official_network_options', tiny_official)
    monkeypatch.setattr(module, 'TAMING_F16_1024', TINY_VQGAN)
    return module


def _vqir(**changes):
    return build_network(dict(copy.deepcopy(TINY_VQIR), **changes))


def test_good_files_are_recognised(script, tmp_path, capsys):
    x16, x32 = tmp_path / 'vqir_x16.pth', tmp_path / 'vqir_x32.pth'
    save_state_dict(_vqir().state_dict(), str(x16))  # the authors' plain state_dict
    save_state_dict(_vqir(ir_scale=32).state_dict(), str(x32))
    vqgan = VQGAN(**TINY_VQGAN).state_dict()
    ckpt = tmp_path / 'vqgan_imagenet_f16_1024.ckpt'  # taming's Lightning file
    torch.save({'state_dict': {**vqgan, 'loss.discriminator.main.0.weight': torch.zeros(2, 3, 4, 4)},
                'global_step': 10}, str(ckpt))
    assert script.main([str(x16), str(x32), str(ckpt)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f'ok: {x16}: plain state_dict, ') and 'VQIR stage 2, 16x' in out[0]
    assert 'VQIR stage 2, 32x' in out[1] and 'sha256 ' in out[1]
    assert out[2].startswith(f'ok: {ckpt}: PyTorch-Lightning checkpoint') and '1 training-only entries' in out[2]


@pytest.mark.parametrize('case, message', [
    ('wrong_scale', 'a 32x network, expected 16x'),
    ('vqgan_as_vqir', 'no icrm.* entries: not a VQIR network'),
    ('reshaped', '1 of another shape (quantize.embedding.weight (32, 64) (expected (64, 64)))'),
    ('truncated', 'vqir_x16.pth: '),
])
def test_bad_files_are_one_error_line_each(script, tmp_path, capsys, case, message):
    path = tmp_path / 'vqir_x16.pth'
    if case == 'wrong_scale':
        save_state_dict(_vqir(ir_scale=32).state_dict(), str(path))
    elif case == 'vqgan_as_vqir':
        save_state_dict(VQGAN(**TINY_VQGAN).state_dict(), str(path))
    elif case == 'reshaped':
        state = _vqir().state_dict()
        state['quantize.embedding.weight'] = state['quantize.embedding.weight'][:32]
        save_state_dict(state, str(path), param_key='params')
    else:
        save_state_dict(_vqir().state_dict(), str(path))
        path.write_bytes(path.read_bytes()[:1000])
    assert script.main([str(path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
    assert len(err) == 1 and err[0].startswith(f'error: {path}: ') and message in err[0], err
