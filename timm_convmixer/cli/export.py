""" ``timm-convmixer export``: a ConvMixer to an ONNX file (opset 17+) that onnxruntime runs as PyTorch does

Exporter choice: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) by default, with one
pass of our own over its output. Why this one and not the torch.export-based exporter that is torch's default
since 2.9:

* it writes exactly the requested opset (17 to 23 checked with torch 2.14.1 and 2.15); the torch.export-based
  exporter writes opset 18 when asked for 17 (onnxscript's ``Pad`` has no down-converter to 17), whatever the caller
  needs;
* it needs nothing beyond ``onnx`` (the other needs ``onnxscript``) and takes ~0.5 s for a small model, not ~2 s.

``padding="same"`` is what used to break it (traced as ``aten::_convolution_mode``, pytorch issues 68880, 108975).
Current torch emits ``Conv(auto_pad="SAME_UPPER")`` for it, which computes the same function (the extra pixel of an
even kernel at the bottom/right, as PyTorch pads), but ONNX marks ``auto_pad`` as kept for legacy uses only and
asks for explicit ``pads``. :func:`explicit_same_pads` therefore rewrites every stride-1 ``SAME_*`` Conv into
explicit pads, asymmetric for the even kernel (``convmixer_512_16_ks8_p7``: ``pads=[3, 3, 4, 4]``), which every
runtime reads the same way. The model's modules and ``state_dict`` are never touched.

``dynamo=True`` selects the torch.export-based exporter instead (needs ``onnxscript``; writes opset 18 or newer;
the same checks and pass run on its output), for the day the TorchScript-based one is gone.

Every export is checked before it replaces OUT: ``onnx.checker``, the opset asked for (or newer), and only
standard ONNX-domain operators (no ATen fallbacks, no custom domains). The file is written beside OUT and renamed.
"""
import argparse
import os
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn

from ..convmixer import EVEN_KERNEL_SPEED_NOTE
from ..weights import load_checkpoint_file
from .args import add_model_kwargs, positive_int
from .atomic import atomic_write

__all__ = ['export_onnx', 'explicit_same_pads', 'check_onnx_graph', 'verify_onnx', 'add_parser', 'run', 'MIN_OPSET']

MIN_OPSET = 17  # the oldest opset this exporter is verified at (issue 5 asks for 17+)
_STANDARD_DOMAINS = ('', 'ai.onnx')
InputSize = Union[int, Sequence[int]]


def _resolve_input_size(model: nn.Module, input_size: Optional[InputSize]) -> Tuple[int, int, int]:
    """``(C, H, W)`` from an int (square), ``(H, W)``, ``(C, H, W)``, or the model's pretrained config."""
    in_chans = int(getattr(model, 'in_chans', 3))
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        input_size = cfg.get('input_size', (in_chans, 224, 224))
    if isinstance(input_size, int):
        input_size = (in_chans, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (in_chans,) + size
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f'input_size: expected H, (H, W) or (C, H, W) with positive sizes, got {input_size!r}')
    if size[0] != in_chans:
        raise ValueError(f'input_size: {size[0]} channels given, the model takes in_chans={in_chans}')
    return size


def explicit_same_pads(model_proto) -> int:
    """Rewrite ``Conv(auto_pad=SAME_UPPER|SAME_LOWER)`` with stride 1 into explicit ``pads``; returns the count.

    At stride 1 "same" padding does not depend on the input size: ``dilation * (k - 1)`` pixels per axis, the odd
    one at the end for SAME_UPPER (PyTorch's rule) or at the start for SAME_LOWER. Strided SAME convs are left as
    they are, since their padding depends on the input size (ConvMixer has none).
    """
    import onnx

    count = 0
    for node in model_proto.graph.node:
        if node.op_type != 'Conv' or node.domain not in _STANDARD_DOMAINS:
            continue
        attrs = {a.name: a for a in node.attribute}
        auto_pad = attrs['auto_pad'].s.decode() if 'auto_pad' in attrs else 'NOTSET'
        if auto_pad not in ('SAME_UPPER', 'SAME_LOWER') or 'kernel_shape' not in attrs:
            continue
        kernel = list(attrs['kernel_shape'].ints)
        strides = list(attrs['strides'].ints) if 'strides' in attrs else [1] * len(kernel)
        dilations = list(attrs['dilations'].ints) if 'dilations' in attrs else [1] * len(kernel)
        if any(s != 1 for s in strides):
            continue
        total = [d * (k - 1) for k, d in zip(kernel, dilations)]
        small, large = [t // 2 for t in total], [t - t // 2 for t in total]
        begin, end = (small, large) if auto_pad == 'SAME_UPPER' else (large, small)
        keep = [a for a in node.attribute if a.name not in ('auto_pad', 'pads')]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(onnx.helper.make_attribute('pads', begin + end))
        count += 1
    return count


def check_onnx_graph(model_proto, min_opset: int = MIN_OPSET) -> int:
    """Raise unless the graph is valid, targets ``min_opset`` or newer and uses standard ONNX operators only.

    Returns the graph's ONNX opset. A non-standard domain would mean an ATen fallback or a custom op that plain
    runtimes (onnxruntime, TensorRT, OpenVINO) may not have.
    """
    import onnx

    onnx.checker.check_model(model_proto)
    opsets = {o.domain: o.version for o in model_proto.opset_import}
    opset = opsets.get('', opsets.get('ai.onnx', 0))
    if opset < min_opset:
        raise RuntimeError(f'ONNX graph has opset {opset}, expected {min_opset} or newer')
    odd = sorted({f'{n.domain}::{n.op_type}' for n in model_proto.graph.node
                  if n.domain not in _STANDARD_DOMAINS or n.op_type.startswith('ATen')})
    if odd:
        raise RuntimeError(f'ONNX graph uses non-standard operators: {", ".join(odd)}')
    return opset


def _torch_export(
        model: nn.Module,
        path: str,
        example: torch.Tensor,
        opset: int,
        dynamic_batch: bool,
        dynamo: bool,
) -> None:
    names = dict(input_names=['input'], output_names=['output'])
    with warnings.catch_warnings():
        # chosen on purpose (module docstring); and ConvMixer's input check reads x.shape, a constant for the tracer
        warnings.filterwarnings('ignore', message='You are using the legacy TorchScript-based ONNX export')
        warnings.filterwarnings('ignore', message='The feature will be removed', module=r'torch\.onnx')
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning, module=r'timm_convmixer\.')
        # a speed note of PyTorch's eager conv (even kernel), nothing to do with the exported graph
        warnings.filterwarnings('ignore', message=EVEN_KERNEL_SPEED_NOTE)
        if dynamo:
            # onnxscript implements opset 18+ only; asked for 17 it would try (and, for Pad, fail) to down-convert
            dynamic_shapes = ({0: torch.export.Dim('batch', min=1)},) if dynamic_batch else None
            torch.onnx.export(
                model, (example,), path, dynamo=True, opset_version=max(opset, 18), dynamic_shapes=dynamic_shapes,
                external_data=False, verbose=False, **names)
        else:
            dynamic_axes = {'input': {0: 'batch'}, 'output': {0: 'batch'}} if dynamic_batch else None
            torch.onnx.export(
                model, (example,), path, dynamo=False, opset_version=opset, dynamic_axes=dynamic_axes,
                do_constant_folding=True, **names)


def export_onnx(
        model: nn.Module,
        path: Union[str, os.PathLike],
        input_size: Optional[InputSize] = None,
        opset: int = MIN_OPSET,
        dynamic_batch: bool = True,
        batch_size: int = 1,
        dynamo: bool = False,
        check: Optional[Callable[[str], None]] = None,
) -> str:
    """Export ``model`` (in eval mode) to an ONNX file at ``path``; returns the path.

    Args:
        model: a ConvMixer (any ``nn.Module`` taking one NCHW image batch works).
        path: the ``.onnx`` file to write; replaced only once the new file has passed its checks.
        input_size: ``(C, H, W)``, ``(H, W)`` or an int; default the model's ``pretrained_cfg['input_size']``.
            ConvMixer works at any size, but the exported graph is fixed to this one (only the batch may vary).
        opset: ONNX opset, 17 or newer.
        dynamic_batch: leave the batch dimension free (``batch``) instead of fixing it to ``batch_size``.
        batch_size: batch of the example input used for tracing.
        dynamo: use torch's torch.export-based exporter (needs ``onnxscript``) instead of the TorchScript-based one.
        check: called with the new file's path before it replaces ``path`` (``--verify``); what it raises leaves
            ``path`` as it was.
    """
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('export_onnx needs the onnx package: pip install onnx') from e
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f'opset: expected an integer >= {MIN_OPSET}, got {opset!r}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size: expected a positive integer, got {batch_size!r}')
    path = os.fspath(path)
    size = _resolve_input_size(model, input_size)
    ref = next(model.parameters(), None)
    example = torch.randn(
        (batch_size,) + size,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )

    def write(tmp: str) -> None:
        with torch.no_grad():
            _torch_export(model, tmp, example, opset, dynamic_batch, dynamo)
        proto = onnx.load(tmp)
        explicit_same_pads(proto)
        check_onnx_graph(proto, min_opset=opset)
        onnx.save(proto, tmp)
        if check is not None:
            check(tmp)

    was_training = model.training
    model.eval()
    try:
        atomic_write(path, write)  # only a file that passed every check is renamed to OUT
    finally:
        model.train(was_training)
    return path


def verify_onnx(
        model: nn.Module,
        path: Union[str, os.PathLike],
        input_size: Optional[InputSize] = None,
        batch_sizes: Sequence[int] = (1, 2),
        seed: int = 0,
) -> float:
    """Run the ONNX file with onnxruntime (CPU) and the model in PyTorch on the same random input.

    Returns the largest absolute difference over ``batch_sizes`` (use ``(1,)`` for a fixed-batch export).
    """
    import numpy as np
    import onnxruntime as ort

    size = _resolve_input_size(model, input_size)
    session = ort.InferenceSession(os.fspath(path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    ref = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    worst = 0.
    try:
        for batch in batch_sizes:
            x = torch.randn((batch,) + size, generator=generator)
            if ref is not None:
                x = x.to(ref.dtype)  # the graph's input dtype is the model's
            with torch.no_grad():
                expected = model(x.to(ref.device if ref is not None else 'cpu')).float().cpu().numpy()
            got = session.run(None, {input_name: x.numpy()})[0].astype(np.float32)
            if got.shape != expected.shape:
                raise RuntimeError(f'onnxruntime output shape {got.shape} != PyTorch {expected.shape}')
            worst = max(worst, float(np.abs(got - expected).max()))
    finally:
        model.train(was_training)
    return worst


def run(args: argparse.Namespace) -> int:
    input_size = None
    if args.input_size:
        input_size = args.input_size[0] if len(args.input_size) == 1 else tuple(args.input_size)
    model = timm.create_model(args.model, pretrained=args.pretrained, **args.model_kwargs)
    if args.checkpoint:
        load_checkpoint_file(model, args.checkpoint)
    size = _resolve_input_size(model, input_size)
    batches = (args.batch_size,) if args.static_batch else (1, 3)

    def verify(tmp: str) -> None:  # before the file replaces OUT: a file that fails never does
        diff = verify_onnx(model, tmp, size, batch_sizes=batches)
        ok = diff <= args.atol
        print(f'onnxruntime vs PyTorch, batch {"/".join(map(str, batches))}: max abs diff {diff:.3g} '
              f'({"ok" if ok else "FAILED"}, atol {args.atol:g})')
        if not ok:
            raise RuntimeError(f'the export differs from PyTorch beyond --atol {args.atol:g}; {args.out} was not '
                               'written (or left as it was)')
    path = export_onnx(
        model, args.out, size, opset=args.opset, dynamic_batch=not args.static_batch,
        batch_size=args.batch_size, dynamo=args.dynamo, check=verify if args.verify else None)
    import onnx
    opset = check_onnx_graph(onnx.load(path), min_opset=args.opset)
    mb = os.path.getsize(path) / 2 ** 20
    batch = args.batch_size if args.static_batch else 'dynamic'
    print(f'wrote {path} ({mb:.1f} MiB): {args.model}, input (batch={batch}, {", ".join(map(str, size))}), '
          f'opset {opset}, {"torch.export" if args.dynamo else "TorchScript"}-based exporter')
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the ``timm-convmixer`` command line."""
    parser = subparsers.add_parser(
        'export',
        help='export a ConvMixer to ONNX (opset 17+, dynamic batch), checked and optionally verified',
        description=__doc__.strip().splitlines()[0],
    )
    parser.add_argument('--model', required=True, help='ConvMixer name, e.g. convmixer_512_16_ks8_p7')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--checkpoint', default=None,
                        help='weights to load, as timm.create_model(checkpoint_path=...) would (timm or authors\' '
                             'layout, train.py checkpoints: EMA weights first)')
    parser.add_argument('--pretrained', action='store_true', help='load the default pretrained weights (Hub)')
    parser.add_argument('--input-size', type=int, nargs='+', default=None, metavar='N',
                        help='H, H W or C H W (default: the model\'s pretrained_cfg input_size)')
    parser.add_argument('--opset', type=int, default=MIN_OPSET, help=f'ONNX opset, >= {MIN_OPSET} (default)')
    parser.add_argument('--batch-size', type=positive_int, default=1,
                        help='example batch (the batch of a --static-batch file)')
    parser.add_argument('--static-batch', action='store_true',
                        help='fix the batch dimension instead of leaving it free')
    parser.add_argument('--dynamo', action='store_true',
                        help='use torch.export-based ONNX exporter (needs onnxscript) instead of the TorchScript one')
    parser.add_argument('--verify', action='store_true',
                        help='run the file with onnxruntime and compare with PyTorch; exit 1 if above --atol')
    parser.add_argument('--atol', type=float, default=1e-4, help='--verify tolerance (default 1e-4)')
    add_model_kwargs(parser, help='architecture overrides, e.g. depth=2 num_classes=10')
    parser.set_defaults(func=run)
    return parser
