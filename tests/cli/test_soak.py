"""Soak: ``vqir-rescale down`` over a folder of 200 images of mixed sizes and kinds plus broken files.

Every good image (sides 16 to 96 pixels, many not multiples of 16; RGB, grey, RGBA, 16-bit) gets
its LR with the right size, every broken file (truncated, empty, text, decompression bomb) is
reported with one error line, the exit status is 1, and the process does not grow: its resident
memory after the last file is within 10% of that after the tenth (by which point the largest
image of every kind has been through). The work is in ``scripts/benchmark/soak_rescale.py``, which also
runs longer soaks by hand. Deselect with ``-m "not soak"``.
"""
import importlib.util
import os
from os import path as osp

import pytest
import torch

from helpers import ROOT
pytestmark = pytest.mark.soak


def _load_soak_module():
    spec = importlib.util.spec_from_file_location('soak_rescale',
                                                  osp.join(ROOT, 'scripts', 'benchmark', 'soak_rescale.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not osp.exists('/proc/self/statm'), reason='reads resident memory from Linux /proc')
def test_rescale_down_soak_200_images(tmp_path, capsys):
    soak = _load_soak_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        good, bad = soak.make_soak_folder(str(tmp_path / 'images'), count=200, seed=0)
        weights = soak.random_weights(soak.DEFAULT_OPT, str(tmp_path / 'tiny_stage2.pth'))
        status, rss = soak.run_down(str(tmp_path / 'images'), str(tmp_path / 'lr'), weights)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err

    kinds = {kind for _, _, kind in good.values()}
    sides = [side for h, w, _ in good.values() for side in (h, w)]
    assert len(good) == 200 and kinds == {'rgb', 'gray', 'rgba', 'rgb16'} and len(bad) == 4
    assert min(sides) == 16 and max(sides) == 96 and sum(side % 16 != 0 for side in sides) > 300

    assert status == 1
    assert soak.check_outputs(str(tmp_path / 'lr'), good) == []  # every good file, the right LR, nothing else
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == len(bad)
    for name in bad:
        assert sum(line.startswith(f'error: {tmp_path / "images" / name}: ') for line in errors) == 1, (name, err)
    assert f'200 written to {tmp_path / "lr"}, 4 failed' in err

    assert len(rss) == 204  # read after every file, broken ones included
    tenth, last = rss[soak.WARM_UP - 1], rss[-1]
    print(f'RSS after file 10: {tenth / 2**20:.1f} MiB; after file 204: {last / 2**20:.1f} MiB '
          f'({(last / tenth - 1) * 100:+.1f}%); peak {max(rss) / 2**20:.1f} MiB')
    assert last <= 1.10 * tenth, (tenth, last)
    assert not [name for name in os.listdir(tmp_path / 'lr') if name.startswith('.')]  # no temporaries
