"""Deployment: ONNX (onnxruntime vs PyTorch), torch.export and TorchScript for every registered variant.

Each variant is built with its own dim, kernel, patch and activation but ``depth=2`` and an input a few patches wide
(non-square, so an H/W mix-up shows), which keeps the exports fast while exercising each kernel's padding. BatchNorm
statistics and affine parameters are randomised so the comparisons are not of near-identity layers.
"""
import functools
import os
import warnings

import numpy as np
import pytest
import torch

import timm
import timm_convmixer
from helpers import Uniform
from timm_convmixer.cli import main as cli_main
from timm_convmixer.cli.export import MIN_OPSET, check_onnx_graph, export_onnx

try:
    import onnx
    import onnxruntime as ort
except ImportError:  # only the ONNX tests need them; torch.export and TorchScript still run
    onnx = ort = None
requires_onnx = pytest.mark.skipif(ort is None, reason='onnx and onnxruntime are not installed')

VARIANTS = timm.list_models('convmixer*')
EVEN_KERNEL = 'convmixer_512_16_ks8_p7'
ATOL = RTOL = 1e-4


def _input_size(patch_size: int):
    """A few tokens per side, H != W: 16x16 for CIFAR-size patches, 9x10 at patch 7, 8x9 at patch 14."""
    if patch_size <= 2:
        return 3, 32, 32
    if patch_size >= 14:
        return 3, 8 * patch_size, 9 * patch_size
    return 3, 9 * patch_size, 10 * patch_size


@pytest.fixture
def make(small_model):
    """A variant at depth 2 (unless given), BatchNorm statistics and affine randomised, eval mode."""
    bn = dict(mean=Uniform(-.5, .5), var=Uniform(.5, 1.5), weight=Uniform(.5, 1.5), bias=Uniform(-.5, .5))
    return functools.partial(small_model, randomize=bn)


def _run_ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _same_pads(k: int):
    lo = (k - 1) // 2
    return [lo, lo, k - 1 - lo, k - 1 - lo]  # ONNX order: [top, left, bottom, right]


def _conv_attrs(proto):
    for node in proto.graph.node:
        if node.op_type == 'Conv':
            yield {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_every_variant_is_covered():
    assert sorted(VARIANTS) == timm_convmixer.list_variants()
    assert len(VARIANTS) == 8 and EVEN_KERNEL in VARIANTS


@requires_onnx
@pytest.mark.parametrize('name', VARIANTS)
def test_onnx_matches_pytorch(name, tmp_path, make):
    model = make(name)
    size = _input_size(model.patch_size)
    path = export_onnx(model, tmp_path / f'{name}.onnx', size, opset=17)
    assert sorted(os.listdir(tmp_path)) == [f'{name}.onnx']  # no temporary file left behind

    proto = onnx.load(path)
    assert check_onnx_graph(proto) == 17
    assert {n.domain for n in proto.graph.node} <= {'', 'ai.onnx'}
    assert not [n.op_type for n in proto.graph.node if n.op_type.startswith('ATen')]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField('dim_value')

    k = model.kernel_size
    convs = list(_conv_attrs(proto))
    depthwise = [c for c in convs if c.get('group', 1) == model.num_features and c['kernel_shape'] == [k, k]]
    assert len(depthwise) == 2
    for c in convs:
        assert c.get('auto_pad', b'NOTSET') in (b'NOTSET', 'NOTSET')
    for c in depthwise:
        assert c['pads'] == _same_pads(k)

    for batch in (1, 3):
        x = torch.randn((batch,) + size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = _run_ort(path, x)
        assert got.shape == expected.shape == (batch, model.num_classes)
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@requires_onnx
def test_onnx_check_names_non_standard_operators():
    """A graph with an ATen fallback (a valid ONNX graph, which plain runtimes cannot run) is refused by name."""
    from onnx import TensorProto, helper
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ('x', 'y')]
    nodes = [helper.make_node('Relu', ['x'], ['t']), helper.make_node('ATen', ['t'], ['y'], domain='org.pytorch.aten')]
    proto = helper.make_model(helper.make_graph(nodes, 'g', io[:1], io[1:]), opset_imports=[
        helper.make_opsetid('', MIN_OPSET), helper.make_opsetid('org.pytorch.aten', 1)])
    with pytest.raises(RuntimeError, match='non-standard operators: org.pytorch.aten::ATen$'):
        check_onnx_graph(proto)


@requires_onnx
def test_onnx_even_kernel_pads_the_pytorch_side(tmp_path, make):
    """Kernel 8 pads 3 before and 4 after; the same graph padded 4/3 must disagree (so the check above can fail)."""
    model = make(EVEN_KERNEL)
    size = _input_size(model.patch_size)
    path = export_onnx(model, tmp_path / 'ks8.onnx', size)
    proto = onnx.load(path)
    pads = [c['pads'] for c in _conv_attrs(proto) if c['kernel_shape'] == [8, 8]]
    assert pads == [[3, 3, 4, 4]] * 2

    x = torch.randn((2,) + size)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run_ort(path, x), expected, rtol=RTOL, atol=ATOL)

    for node in proto.graph.node:
        for a in node.attribute:
            if node.op_type == 'Conv' and a.name == 'pads' and list(a.ints) == [3, 3, 4, 4]:
                a.ints[:] = [4, 4, 3, 3]
    mirrored = tmp_path / 'mirrored.onnx'
    onnx.save(proto, mirrored)
    assert np.abs(_run_ort(mirrored, x) - expected).max() > 100 * ATOL


@requires_onnx
def test_onnx_full_depth_small_variant(tmp_path, make):
    model = make('convmixer_256_8_ks5_p2', depth=8)
    path = export_onnx(model, tmp_path / 'full.onnx', (3, 32, 32), opset=17)
    proto = onnx.load(path)
    assert sum(1 for c in _conv_attrs(proto) if c['kernel_shape'] == [5, 5]) == 8
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_run_ort(path, x), expected, rtol=RTOL, atol=ATOL)


@requires_onnx
def test_onnx_static_batch_and_newer_opset(tmp_path, make):
    model = make('convmixer_768_32')  # ReLU, kernel 7
    path = export_onnx(model, tmp_path / 'static.onnx', 70, opset=18, dynamic_batch=False, batch_size=2)
    proto = onnx.load(path)
    assert check_onnx_graph(proto, min_opset=18) == 18
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 70, 70]
    x = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run_ort(path, x), expected, rtol=RTOL, atol=ATOL)
    assert model.training is False


@requires_onnx
def test_onnx_dynamo_exporter_even_kernel(tmp_path, make):
    """The torch.export-based exporter (torch's default since 2.9) as the alternative route: opset 18+."""
    pytest.importorskip('onnxscript')
    model = make(EVEN_KERNEL)
    size = _input_size(model.patch_size)
    path = export_onnx(model, tmp_path / 'dynamo.onnx', size, opset=17, dynamo=True)
    proto = onnx.load(path)
    assert check_onnx_graph(proto) >= 18
    assert [c['pads'] for c in _conv_attrs(proto) if c['kernel_shape'] == [8, 8]] == [[3, 3, 4, 4]] * 2
    for batch in (1, 3):
        x = torch.randn((batch,) + size)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_run_ort(path, x), expected, rtol=RTOL, atol=ATOL)


@requires_onnx
def test_onnx_export_argument_checks(tmp_path, make):
    model = make('convmixer_256_8_ks5_p2')
    with pytest.raises(ValueError, match='opset'):
        export_onnx(model, tmp_path / 'a.onnx', 32, opset=MIN_OPSET - 1)
    with pytest.raises(ValueError, match='in_chans'):
        export_onnx(model, tmp_path / 'a.onnx', (1, 32, 32))
    assert not os.listdir(tmp_path)


@requires_onnx
def test_onnx_training_mode_restored(tmp_path, make):
    model = make('convmixer_256_8_ks5_p2').train()
    export_onnx(model, tmp_path / 't.onnx', 32)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize('name', VARIANTS)
def test_torch_export(name, make):
    model = make(name)
    size = _input_size(model.patch_size)
    x = torch.randn((2,) + size)
    batch = torch.export.Dim('batch', min=1)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    exported = program.module()
    for b in (2, 3):
        xb = torch.randn((b,) + size)
        with torch.no_grad():
            torch.testing.assert_close(exported(xb), model(xb))


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.filterwarnings(r'ignore:`torch\.jit\.\w+` is deprecated:FutureWarning')
def test_torchscript_script_and_trace(name, tmp_path, make):
    model = make(name)
    size = _input_size(model.patch_size)
    x = torch.randn((2,) + size)
    scripted = torch.jit.script(model)  # deprecated in torch 2.15 (warning filtered above), still supported
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)  # the input check reads x.shape
        traced = torch.jit.trace(model, x, check_trace=False)
    # a deployed module goes through save/load, so test that copy
    torch.jit.save(scripted, str(tmp_path / 'scripted.pt'))
    scripted = torch.jit.load(str(tmp_path / 'scripted.pt'))
    for b in (2, 3):
        xb = torch.randn((b,) + size)
        with torch.no_grad():
            expected = model(xb)
            torch.testing.assert_close(scripted(xb), expected)
            torch.testing.assert_close(traced(xb), expected)


@pytest.mark.filterwarnings(r'ignore:`torch\.jit\.\w+` is deprecated:FutureWarning')
def test_torch_export_and_trace_see_the_plain_modules(make, run_counted):
    """Tracers and exporters must record the plain modules, never a fused fast path (fast.counters says which ran:
    'eager' only, every block at least once; under torch.export's Dynamo tracing nothing is counted, so the exported
    graph itself is read: the plain modules' ops, one convolution per conv layer, none of the fused ones)."""
    model = make('convmixer_256_8_ks5_p2')
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # where the CPU fast path would otherwise answer (forced: auto might time it slower)
        _, paths = run_counted(model, x, backend='cpu')
        assert paths == {'cpu': 2}
        program, paths = run_counted(torch.export.export, model, (x,), backend='cpu')
        assert paths == {}
        ops = [str(n.target) for n in program.graph.nodes if n.op == 'call_function']
        assert sum(op.startswith('aten.conv2d') for op in ops) == 1 + 2 * len(model.blocks)
        assert ops.count('aten.batch_norm.default') == 1 + 2 * len(model.blocks)
        assert not any('mkldnn' in op or 'timm_convmixer' in op for op in ops)
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            _, paths = run_counted(lambda: torch.jit.trace(model, x, check_trace=False), backend='cpu')
        assert list(paths) == ['eager'] and paths['eager'] >= 2


@requires_onnx
def test_onnx_export_sees_the_plain_modules(tmp_path, make, run_counted):
    model = make('convmixer_256_8_ks5_p2')
    with torch.no_grad():
        _, paths = run_counted(export_onnx, model, tmp_path / 'plain.onnx', 32)
    assert list(paths) == ['eager'] and paths['eager'] >= 2


@requires_onnx
def test_cli_export_with_checkpoint(tmp_path, capsys, make, monkeypatch):
    """``timm-convmixer export --checkpoint``: the file carries the checkpoint's weights, verified by onnxruntime."""
    model = make(EVEN_KERNEL, num_classes=10)
    checkpoint = tmp_path / 'ckpt.pth'
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / 'cli' / 'ks8.onnx'
    rc = cli_main([
        'export', '--model', EVEN_KERNEL, '--checkpoint', str(checkpoint), '--model-kwargs', 'depth=2',
        'num_classes=10', '--input-size', '56', '63', '--opset', '17', '--out', str(out), '--verify'])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'opset 17' in printed and 'max abs diff' in printed and '(ok' in printed

    x = torch.randn(3, 3, 56, 63)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run_ort(out, x), expected, rtol=RTOL, atol=ATOL)

    # a file that fails --verify never replaces OUT; bad input is one line, not a traceback
    before = out.read_bytes()
    rc = cli_main([
        'export', '--model', EVEN_KERNEL, '--checkpoint', str(checkpoint), '--model-kwargs', 'depth=2',
        'num_classes=10', '--input-size', '56', '63', '--out', str(out), '--verify', '--atol', '0'])
    err = capsys.readouterr().err
    assert rc == 1 and out.read_bytes() == before and 'was not written' in err, err
    assert not [p for p in out.parent.iterdir() if p.name != out.name]
    unknown = ['export', '--model', 'convmixer_999', '--out', str(tmp_path / 'x.onnx')]
    for switch in ('', '0'):
        monkeypatch.setenv('TIMM_CONVMIXER_TRACEBACK', switch)
        assert cli_main(unknown) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            'timm-convmixer export: error: Unknown model (convmixer_999) (TIMM_CONVMIXER_TRACEBACK=1 shows where it '
            'was raised)']
    monkeypatch.setenv('TIMM_CONVMIXER_TRACEBACK', '1')
    with pytest.raises(RuntimeError, match='Unknown model'):
        cli_main(unknown)
