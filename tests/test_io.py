"""Atomic writes shared by convert, the demo, the benchmark and the ONNX export, and the modes they leave."""
import contextlib
import json
import os
import stat

import pytest

from timm_convmixer.cli.atomic import atomic_write, atomic_write_dir, atomic_write_json


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'out.json'
    atomic_write_json(str(path), {'a': 1})
    assert json.loads(path.read_text()) == {'a': 1}

    def broken(tmp):
        with open(tmp, 'w') as f:
            f.write('{"half": ')
        raise RuntimeError('writer failed')

    with pytest.raises(RuntimeError, match='writer failed'):
        atomic_write(str(path), broken)
    assert json.loads(path.read_text()) == {'a': 1}
    assert sorted(os.listdir(tmp_path)) == ['out.json']


def test_keeps_extension_for_the_writer_and_umask_permissions(tmp_path):
    seen = []
    out = atomic_write(str(tmp_path / 'sub' / 'chart.png'), lambda tmp: (seen.append(tmp), open(tmp, 'wb').close()))
    assert seen[0].endswith('.png') and os.path.dirname(seen[0]) == str(tmp_path / 'sub')
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes_under(root):
    """``{relative path: permission bits}`` of ``root`` and everything in it."""
    out = {'.': stat.S_IMODE(os.stat(root).st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest.mark.parametrize('mask', [0o022, 0o077])
def test_folder_write_gets_umask_modes_and_is_all_or_nothing(tmp_path, mask):
    def write(tmp):
        with open(os.path.join(tmp, 'a.json'), 'w') as f:
            f.write('{}')
        os.mkdir(os.path.join(tmp, 'sub'))
        fd = os.open(os.path.join(tmp, 'sub', 'private.bin'), os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors does
        os.close(fd)

    with umask(mask):
        out = atomic_write_dir(str(tmp_path / 'folder'), write)
    dirs, files = 0o777 & ~mask, 0o666 & ~mask
    assert modes_under(out) == {'.': dirs, 'a.json': files, 'sub': dirs, 'sub/private.bin': files}

    with pytest.raises(FileExistsError):
        atomic_write_dir(out, write)

    def broken(tmp):
        write(tmp)
        raise RuntimeError('check failed')

    with pytest.raises(RuntimeError, match='check failed'):
        atomic_write_dir(out, broken, replace=True)
    assert sorted(os.listdir(tmp_path)) == ['folder']  # old folder kept, no temporary left
    atomic_write_dir(out, lambda tmp: open(os.path.join(tmp, 'new'), 'w').close(), replace=True)
    assert sorted(os.listdir(out)) == ['new'] and sorted(os.listdir(tmp_path)) == ['folder']


def test_every_command_writes_with_umask_022_modes(tmp_path):
    """convert, export, bench and the demo, run for real on tiny models: folders 0755, files 0644 under umask 022.

    tempfile's 0600 files / 0700 folders and safetensors' 0600 ``model.safetensors`` would keep other users and
    service accounts out of what these commands write.
    """
    pytest.importorskip('matplotlib')
    pytest.importorskip('onnx')
    import timm
    import torch
    from safetensors.torch import save_file
    from timm_convmixer import cli
    from timm_convmixer.cli.export import export_onnx

    with umask(0o022):
        root = tmp_path / 'outputs'
        root.mkdir()
        model = timm.create_model('convmixer_256_8_ks5_p2', depth=1, dim=8).eval()
        save_file(model.state_dict(), str(tmp_path / 'weights.safetensors'))
        assert cli.main(['convert', str(tmp_path / 'weights.safetensors'), str(root / 'converted'),
                         '--model', 'convmixer_256_8_ks5_p2', '--model-kwargs', 'depth=1', 'dim=8']) == 0
        export_onnx(model, root / 'onnx' / 'model.onnx', 16)
        assert cli.main(['bench', '--models', 'convmixer_256_8_ks5_p2', '--model-kwargs', 'depth=1', 'dim=8',
                         '--img-size', '16', '--batch-size', '1', '--iters', '1', '--warmup', '0', '--no-progress',
                         '--device', 'cpu', '--out', str(root / 'bench' / 'r.json'),
                         '--chart', str(root / 'bench' / 'r.png')]) == 0
        assert cli.main(['demo', '--output', str(root / 'demo'), '--epochs', '1', '--shapes-per-class', '2',
                         '--batch-size', '8', '--model-kwargs', 'dim=8', 'depth=1', '--workers', '0',
                         '--no-progress', '--min-accuracy', '0']) == 0
        torch.manual_seed(0)  # the demo seeds torch; leave the process as the other tests expect it
    modes = modes_under(root)
    for must in ('converted/model.safetensors', 'converted/config.json', 'converted/README.md', 'onnx/model.onnx',
                 'bench/r.json', 'bench/r.png', 'demo/results.json', 'demo/curves.png',
                 'demo/checkpoints/model_best.pth.tar', 'demo/shapes/shapes.json'):
        assert must in modes
    wrong = {path: oct(mode) for path, mode in modes.items()
             if mode != (0o755 if os.path.isdir(root / path) else 0o644)}
    assert not wrong
