"""Atomic writes shared by the demo, the benchmark and the ONNX export."""
import json
import os

import pytest

from timm_convmixer._io import atomic_write, atomic_write_json


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
