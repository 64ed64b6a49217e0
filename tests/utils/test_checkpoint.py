"""vqir.utils.checkpoint: formats, strictness, safety against code in pickles, atomic writes, converter."""
import importlib.util
import logging
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from vqir.archs.discriminator_arch import PatchGANDiscriminator
from vqir.archs.vqgan_arch import VQGAN
from vqir.utils import checkpoint as ckpt_module
from vqir.utils.checkpoint import (CheckpointError, atomic_torch_save, load_checkpoint, load_state_dict, load_weights,
                                   save_state_dict)

TINY = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=16, n_embed=64, embed_dim=8)


class HyperParameters:
    """A non-tensor object of a class weights_only does not know, as Lightning stores them."""

    def __init__(self):
        self.learning_rate = 4.5e-6
        self.ddconfig = {'ch': 32, 'ch_mult': [1, 1, 2]}


def create_marker(path):
    """What a malicious checkpoint would run: it leaves a file behind."""
    with open(path, 'w', encoding='utf-8') as f:
        f.write('code ran')


class CallsFunction:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (create_marker, (self.marker, ))


class CallsExec:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").close()', ))


class CallsSystem:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def _logger():
    logger = logging.getLogger('vqir.test_checkpoint')
    logger.setLevel(logging.INFO)
    return logger


def _tiny_vqgan(seed):
    torch.manual_seed(seed)
    return VQGAN(**TINY).eval()


def _taming_ckpt(net, path, legacy_format=False):
    """A file laid out like a taming/Lightning .ckpt: weights under 'state_dict' next to training state."""
    discriminator = PatchGANDiscriminator(ndf=8, n_layers=2)
    state_dict = OrderedDict(net.state_dict())
    state_dict.update(('loss.discriminator.' + k, v) for k, v in discriminator.state_dict().items())
    state_dict['loss.perceptual_loss.lin0.model.1.weight'] = torch.randn(1, 64, 1, 1)
    state_dict['loss.logvar'] = torch.zeros(())
    optimizer = torch.optim.Adam(net.parameters())
    checkpoint = {
        'epoch': 12,
        'global_step': 345678,
        'pytorch-lightning_version': '1.0.8',
        'state_dict': state_dict,
        'optimizer_states': [optimizer.state_dict()],
        'lr_schedulers': [],
        'hyper_parameters': HyperParameters(),
        'callbacks': {HyperParameters: {'best_model_path': 'x.ckpt'}},  # a class as a dict key, as old Lightning
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy_format)
    n_loss_keys = sum(k.startswith('loss.') for k in state_dict)
    return n_loss_keys


@pytest.mark.parametrize('legacy_format', [False, True])
def test_taming_ckpt_loads_and_reproduces_reconstruction(tmp_path, legacy_format):
    source = _tiny_vqgan(seed=1)
    path = tmp_path / 'last.ckpt'
    n_loss_keys = _taming_ckpt(source, path, legacy_format)
    with pytest.raises(pickle.UnpicklingError):  # what plain weights_only does with such a file
        torch.load(path, map_location='cpu', weights_only=True)

    target = _tiny_vqgan(seed=2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert not torch.equal(target(x)[0], source(x)[0])
        report = load_weights(target, path, logger=_logger())
        assert torch.equal(target(x)[0], source(x)[0])
    assert len(report.dropped) == n_loss_keys and all(k.startswith('loss.') for k in report.dropped)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.loaded == len(source.state_dict())

    whole = load_checkpoint(path)
    assert whole['global_step'] == 345678 and whole['epoch'] == 12
    assert type(whole['hyper_parameters']).__name__ == 'Placeholder'  # inert, the class was not imported


def test_dropped_keys_are_logged_with_counts(tmp_path, caplog):
    path = tmp_path / 'last.ckpt'
    n_loss_keys = _taming_ckpt(_tiny_vqgan(seed=1), path)
    with caplog.at_level(logging.INFO, logger='vqir.test_checkpoint'):
        load_weights(_tiny_vqgan(seed=2), path, logger=_logger())
    assert f'dropped {n_loss_keys} keys not used by VQGAN (loss.*: {n_loss_keys})' in caplog.text


def test_param_keys_plain_module_prefix_and_safetensors_round_trips(tmp_path):
    net = _tiny_vqgan(seed=3)
    ema = _tiny_vqgan(seed=4)
    state, ema_state = net.state_dict(), ema.state_dict()

    def same(loaded, expected, ordered=True):
        if ordered and list(loaded) != list(expected):
            return False
        return set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)

    save_state_dict(net, tmp_path / 'plain.pth')
    assert same(load_state_dict(tmp_path / 'plain.pth'), state)

    save_state_dict(state, tmp_path / 'params.pth', param_key='params')
    assert list(torch.load(tmp_path / 'params.pth', weights_only=True)) == ['params']
    assert same(load_state_dict(tmp_path / 'params.pth'), state)

    torch.save({'params': state, 'params_ema': ema_state}, tmp_path / 'both.pth')
    assert same(load_state_dict(tmp_path / 'both.pth'), ema_state)  # 'auto' prefers the EMA weights
    assert same(load_state_dict(tmp_path / 'both.pth', param_key='params'), state)
    with pytest.raises(CheckpointError, match=r"both\.pth: no key 'params_x'; available keys: 'params', 'params_ema'"):
        load_state_dict(tmp_path / 'both.pth', param_key='params_x')

    wrapped = torch.nn.DataParallel(net)
    torch.save(wrapped.state_dict(), tmp_path / 'ddp.pth')  # keys start with 'module.'
    assert same(load_state_dict(tmp_path / 'ddp.pth'), state)
    assert load_weights(wrapped, tmp_path / 'ddp.pth', logger=_logger()).loaded == len(state)

    save_state_dict(state, tmp_path / 'net.safetensors')
    # safetensors stores keys sorted, so order is not compared
    assert same(load_file(tmp_path / 'net.safetensors'), state, ordered=False)
    assert same(load_state_dict(tmp_path / 'net.safetensors'), state, ordered=False)
    # recognised by content, whatever the suffix
    os.replace(tmp_path / 'net.safetensors', tmp_path / 'renamed.bin')
    assert same(load_state_dict(tmp_path / 'renamed.bin'), state, ordered=False)
    with pytest.raises(ValueError, match='param_key'):
        save_state_dict(state, tmp_path / 'x.safetensors', param_key='params')


def test_strict_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    state = OrderedDict(_tiny_vqgan(seed=5).state_dict())
    del state['decoder.conv_out.bias']
    state['encoder.down.0.attn.0.q.weight'] = torch.zeros(32, 32, 1, 1)
    state['quantize.embedding.weight'] = torch.zeros(32, 8)
    state['refine.head.weight'] = torch.zeros(3)  # a part VQGAN does not have: dropped, not an error
    path = tmp_path / 'bad.pth'
    torch.save(state, path)

    with pytest.raises(CheckpointError) as info:
        load_weights(_tiny_vqgan(seed=6), path, logger=_logger())
    message = str(info.value)
    assert message.startswith(f'{path}: does not match VQGAN: 1 missing, 1 unexpected, 1 mis-shaped keys')
    assert 'missing (1): decoder.conv_out.bias' in message
    assert 'unexpected (1): encoder.down.0.attn.0.q.weight' in message
    assert 'mis-shaped (1): quantize.embedding.weight (file [32, 8] vs network [64, 8])' in message

    net = _tiny_vqgan(seed=6)
    before = net.decoder.conv_out.bias.clone()
    report = load_weights(net, path, strict=False, logger=_logger())
    assert report.missing == ['decoder.conv_out.bias'] and report.dropped == ['refine.head.weight']
    assert report.mismatched == [('quantize.embedding.weight', (32, 8), (64, 8))]
    assert torch.equal(net.decoder.conv_out.bias, before)
    assert torch.equal(net.encoder.conv_in.weight, state['encoder.conv_in.weight'])


@pytest.mark.parametrize('payload', [CallsFunction, CallsExec, CallsSystem])
def test_pickle_that_runs_code_is_refused(tmp_path, payload):
    marker = tmp_path / 'marker'
    # the payload does run under a plain unpickler, so the refusal below is meaningful
    pickle.loads(pickle.dumps(payload(str(marker))))
    assert marker.exists()
    marker.unlink()

    path = tmp_path / 'evil.ckpt'
    torch.save({'state_dict': _tiny_vqgan(seed=7).state_dict(), 'hook': payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=f'{path}: refused'):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match='refused'):
        load_weights(_tiny_vqgan(seed=7), path, logger=_logger())
    assert not marker.exists()


def test_unreadable_files_give_one_line_errors(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save(_tiny_vqgan(seed=8).state_dict(), good)
    data = good.read_bytes()
    cases = {
        'truncated.pth': (data[:len(data) // 2], 'truncated or corrupt'),
        'empty.pth': (b'', 'empty file'),
        'text.pth': (b'hello, not a checkpoint\n', 'not a checkpoint'),
        'broken.safetensors': (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": [1, 2', 'not a valid safetensors file'),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_state_dict(path)
        assert str(info.value).startswith(f'{path}: {problem}') and '\n' not in str(info.value), str(info.value)
    with pytest.raises(CheckpointError, match='missing.pth: no such file'):
        load_state_dict(tmp_path / 'missing.pth')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='not a state_dict'):
        load_state_dict(tmp_path / 'list.pth')
    torch.save({'state_dict': {'a': 'text'}}, tmp_path / 'nontensor.pth')
    with pytest.raises(CheckpointError, match="entry 'a' of the state_dict \\(key 'state_dict'\\) is a str"):
        load_state_dict(tmp_path / 'nontensor.pth')
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, RuntimeError)


def test_atomic_save_never_leaves_partial_files(tmp_path, monkeypatch):
    state = _tiny_vqgan(seed=9).state_dict()
    target = tmp_path / 'net.pth'
    save_state_dict(state, target)
    assert sorted(os.listdir(tmp_path)) == ['net.pth']
    original = target.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 partial')
        raise OSError('disk full')

    monkeypatch.setattr(ckpt_module.torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        save_state_dict(state, target)  # an existing target is left untouched
    with pytest.raises(OSError, match='disk full'):
        atomic_torch_save({'iter': 1}, tmp_path / 'state.state')  # a new target never appears
    assert sorted(os.listdir(tmp_path)) == ['net.pth']
    assert target.read_bytes() == original
    monkeypatch.undo()

    atomic_torch_save({'iter': 5, 'optimizers': []}, tmp_path / 'training.state')
    assert load_checkpoint(tmp_path / 'training.state') == {'iter': 5, 'optimizers': []}
    save_state_dict(state, tmp_path / 'sub' / 'net.safetensors')  # creates the folder
    assert sorted(os.listdir(tmp_path / 'sub')) == ['net.safetensors']


def test_converter_script_end_to_end(tmp_path, repo_root, capsys):
    source = _tiny_vqgan(seed=10)
    ckpt = tmp_path / 'last.ckpt'
    _taming_ckpt(source, ckpt)
    config = tmp_path / 'vqgan.yaml'
    # taming's own config layout
    config.write_text('model:\n  params:\n    embed_dim: 8\n    n_embed: 64\n    ddconfig:\n      double_z: false\n'
                      '      z_channels: 16\n      resolution: 32\n      in_channels: 3\n      out_ch: 3\n'
                      '      ch: 32\n      ch_mult: [1, 1, 2]\n      num_res_blocks: 1\n'
                      '      attn_resolutions: [8]\n      dropout: 0.0\n')
    script = os.path.join(repo_root, 'scripts', 'model_conversion', 'convert_taming_ckpt.py')

    def run(*args):
        env = dict(os.environ, OMP_NUM_THREADS='1')
        return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                              cwd=repo_root, env=env, timeout=120)

    out = tmp_path / 'vqgan.safetensors'
    result = run(ckpt, out, '--config', config)
    assert result.returncode == 0, result.stderr
    assert 'verified strictly' in result.stdout
    converted = load_file(out)
    assert set(converted) == set(source.state_dict())
    target = _tiny_vqgan(seed=11)
    load_weights(target, out, logger=_logger())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(target(x)[0], source(x)[0])

    # flags instead of a YAML; keep the discriminator (its size is read from the tensors)
    flags = ['--ch', 32, '--ch-mult', 1, 1, 2, '--num-res-blocks', 1, '--z-channels', 16, '--n-embed', 64,
             '--embed-dim', 8]
    result = run(ckpt, tmp_path / 'with_disc.pth', *flags, '--keep-discriminator')
    assert result.returncode == 0, result.stderr
    with_disc = load_state_dict(tmp_path / 'with_disc.pth')
    disc_keys = [k for k in with_disc if k.startswith('loss.')]
    assert disc_keys and all(k.startswith('loss.discriminator.') for k in disc_keys)
    discriminator = PatchGANDiscriminator(ndf=8, n_layers=2)
    load_weights(discriminator, tmp_path / 'with_disc.pth', key_map={'loss.discriminator.': ''}, logger=_logger())
    assert torch.equal(discriminator.main[0].weight, with_disc['loss.discriminator.main.0.weight'])


    # error paths, in-process: non-zero exit, one error line naming the file, no output left behind
    spec = importlib.util.spec_from_file_location('convert_taming_ckpt', script)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    wrong = flags[:-4] + ['--n-embed', 32, '--embed-dim', 8]  # codebook size differs from the file
    assert converter.main([str(a) for a in [ckpt, tmp_path / 'wrong.pth', *wrong]]) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert len(error) == 1 and error[0].startswith(f'error: {tmp_path / "wrong.pth"}: does not match VQGAN')
    assert 'quantize.embedding.weight (file [64, 8] vs network [32, 8])' in error[0]
    assert not (tmp_path / 'wrong.pth').exists()
    assert converter.main([str(tmp_path / 'nothing.ckpt'), str(tmp_path / 'x.pth')]) == 1
    assert 'nothing.ckpt: no such file' in capsys.readouterr().err
    assert converter.main([str(ckpt), str(tmp_path / 'x.txt'), *map(str, flags)]) == 1
    assert 'must end in .pth' in capsys.readouterr().err
