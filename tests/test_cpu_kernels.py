"""Our compiled CPU kernels (``fast/csrc/``: the depthwise half ``dw_block``, the pointwise GEMM ``pw_block``, and
for training the depthwise weight gradient and the batch-statistics normalisation steps): the functions they
compute, the errors they raise, that they compile for each vector ISA, that their build is optional, and that the
path built on them never hands out memory it reuses. Marked ``kernels``: timm's version plays no part, so ``./run.sh
test-min`` leaves them out."""
import os
import shutil
import subprocess
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from timm_convmixer import fast
from timm_convmixer.fast import cpu as fast_cpu
from timm_convmixer.fast import cpu_kernels
from timm_convmixer.fast.eligibility import block_parts

pytestmark = pytest.mark.kernels

ACTS = {
    'identity': lambda z: z, 'relu': F.relu, 'gelu': F.gelu, 'gelu_tanh': lambda z: F.gelu(z, approximate='tanh'),
    'silu': F.silu,
}


def _inputs(n, c, h, w, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, generator=g) / k
    bias, scale = torch.randn(c, generator=g), torch.randn(c, generator=g)
    return x, weight, bias, scale


def _kernel(x, weight, bias, scale, act):
    c, k = weight.shape[0], weight.shape[-1]
    taps = weight.reshape(c, k * k).t().contiguous()
    return cpu_kernels.dw_block(x, taps, bias, scale, k, act, torch.empty_like(x))


def _reference(x, weight, bias, scale, act):
    """The block's depthwise half as eager computes it, in float64."""
    x, weight, bias, scale = (t.double() for t in (x, weight, bias, scale))
    z = F.conv2d(x, weight, bias, padding='same', groups=x.shape[1])
    return x + scale.view(1, -1, 1, 1) * ACTS[act](z)


# channels: partial vectors and blocks (7, 20, 24, 40); kernels odd, even, 1; images 1x1 up to wide/tall enough for
# the kernel to split columns into segments (70 wide) and rows into bands (one image, few channel blocks); rows of
# full tiles and a partial one for kernels 3, 4, 5, 7, 8 and 9; 27-wide rows: a 16-pixel strip, an 8-pixel one and
# single pixels in one row (AVX-512's strips for ConvMixer's kernel sizes)
SHAPES = [
    (2, 24, 9, 13, 5), (1, 7, 5, 6, 3), (3, 40, 8, 8, 8), (1, 32, 1, 1, 9), (2, 16, 70, 3, 9), (1, 16, 6, 70, 9),
    (1, 48, 40, 40, 7), (2, 16, 12, 12, 1), (1, 16, 4, 4, 2), (1, 20, 6, 19, 3), (1, 16, 5, 11, 4),
    (1, 24, 6, 27, 5), (1, 24, 5, 27, 8), (1, 20, 9, 27, 9), (1, 16, 7, 27, 7),
]


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_matches_eager_in_float64(shape, kernels):
    x, weight, bias, scale = _inputs(*shape)
    out = _kernel(x, weight, bias, scale, 'gelu')
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), _reference(x, weight, bias, scale, 'gelu'), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('act', ACTS)
def test_every_activation(act, kernels):
    x, weight, bias, scale = _inputs(2, 40, 11, 9, 7, seed=1)
    x = x * 4  # reach GELU's and SiLU's tails
    torch.testing.assert_close(_kernel(x, weight, bias, scale, act).double(), _reference(x, weight, bias, scale, act),
                               rtol=1e-5, atol=1e-5)


def test_gelu_as_accurate_as_torchs(kernels):
    """GELU on its own (taps zero, input zero: the output is ``gelu(bias)``) over [-12, 12], and on each side of
    every boundary of the AVX-512 kernels' table (``gelu_table.py``): no further from float64 than torch's own
    float32 GELU, give or take a float32 rounding."""
    z = _gelu_points()
    x = torch.zeros(1, z.numel(), 1, 1).contiguous(memory_format=torch.channels_last)
    out = cpu_kernels.dw_block(x, torch.zeros(1, z.numel()), z, torch.ones_like(z), 1, 'gelu', torch.empty_like(x))
    exact = F.gelu(z.double())
    ours = (out.flatten().double() - exact).abs().max().item()
    torchs = (F.gelu(z).double() - exact).abs().max().item()
    assert ours <= torchs + 2 ** -22, (ours, torchs)


def test_gelu_slope_as_accurate_as_torchs(kernels):
    """GELU's slope in the training normalisation's backward (on AVX-512 a table of its own, ``gelu_table.py``), at
    the points above shuffled into 16 channels of ~270 rows: the gradient wrt ``t`` no further from float64 than
    torch's own float32 GELU and BatchNorm backward, give or take a float32 rounding (seen: 1.1e-7 against 2.6e-7,
    the erf-based slope 1.2e-7)."""
    z = _gelu_points()
    z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))][:z.numel() // 16 * 16]
    t = z.view(-1, 16, 1, 1).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)

    def autograd(dtype):
        tt = t.to(dtype).requires_grad_()
        y = F.batch_norm(F.gelu(tt), None, None, None, None, True, 0., 1e-5)
        return torch.autograd.grad(y, tt, grad.to(dtype))[0].double()

    exact = autograd(torch.float64)
    mean, var = cpu_kernels.bn_act_stats(t, 'gelu')
    got = cpu_kernels.bn_act_backward(grad, t, 'gelu', mean.float(), (var + 1e-5).rsqrt().float(), None, None)[0]
    ours = (got.double() - exact).abs().max().item()
    torchs = (autograd(torch.float32) - exact).abs().max().item()
    assert ours <= torchs + 2 ** -22, (ours, torchs)


def _gelu_points():
    """[-12, 12], and each side of every boundary of the AVX-512 kernels' tables, float32."""
    table = _gelu_table()
    edges = torch.arange(1, table.INTERVALS, dtype=torch.float64) * (table.W_MAX / table.INTERVALS)
    edges = torch.cat([edges, -edges]).float()
    return torch.cat([torch.linspace(-12, 12, 4096), edges, torch.nextafter(edges, torch.zeros(())),
                      torch.nextafter(edges, edges * 2)])


def _gelu_table():
    """``csrc/gelu_table.py``, the generator of the AVX-512 kernels' GELU table (a script beside the C++ sources)."""
    import importlib.util
    path = os.path.join(os.path.dirname(cpu_kernels.__file__), 'csrc', 'gelu_table.py')
    spec = importlib.util.spec_from_file_location('gelu_table', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gelu_table_is_what_its_generator_writes():
    """``gelu_table.h`` is the generator's output, not a hand edit: refitting gives the same text."""
    with open(os.path.join(os.path.dirname(cpu_kernels.__file__), 'csrc', 'gelu_table.h')) as f:
        assert f.read() == _gelu_table().header()


def test_gelu_at_infinities_and_nan(kernels):
    """+inf stays +inf (torch's float32 GELU gives NaN) and NaN stays NaN, with either GELU (the table on AVX-512,
    ATen's erf elsewhere). -inf differs between them (0 and NaN) and is left out."""
    z = torch.tensor([float('inf'), float('nan'), 3.0, -3.0])
    x = torch.zeros(1, z.numel(), 1, 1).contiguous(memory_format=torch.channels_last)
    out = cpu_kernels.dw_block(x, torch.zeros(1, z.numel()), z, torch.ones_like(z), 1, 'gelu', torch.empty_like(x))
    out = out.flatten()
    assert out[0] == float('inf') and out[1].isnan(), out
    torch.testing.assert_close(out[2:], F.gelu(z[2:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('capability', sorted(cpu_kernels._ISA_FLAGS))
def test_compiles_for_each_vector_isa(capability, tmp_path):
    """The sources compile for AVX2 and for AVX-512 (8 and 16 floats a vector) whichever this CPU has. This CPU's
    own ISA is built, loaded and run by the tests above, so it is not compiled twice. Unoptimised (-O0 after the
    build's -O3): what is checked (types, templates, the ISA's intrinsics) is the same, and it compiles in a third of
    the time (23 against 77 s for AVX-512 in CI on an AVX2 machine)."""
    from torch.utils.cpp_extension import include_paths
    if capability == torch.backends.cpu.get_cpu_capability() and cpu_kernels.load() is not None:
        pytest.skip(f'{capability} is this CPU\'s: built and run by the other tests')
    cxx = shutil.which(os.environ.get('CXX', 'c++'))
    if cxx is None:
        pytest.skip('no C++ compiler')
    start = time.perf_counter()
    procs = {source: subprocess.Popen(
        [cxx, '-std=c++20', '-fPIC', *cpu_kernels._flags(capability), '-O0', *[f'-isystem{p}' for p in include_paths()],
         '-c', source, '-o', str(tmp_path / (os.path.basename(source) + '.o'))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for source in cpu_kernels.SOURCES}
    for source, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (source, err[-3000:])
    sizes = {os.path.basename(s): (tmp_path / (os.path.basename(s) + '.o')).stat().st_size for s in procs}
    print(f'{capability}: compiled in {time.perf_counter() - start:.1f} s: {sizes}')


def test_fma_probe(kernels):
    """The FMA probe measures a throughput on the current threads and names bad arguments; ``bench --engines`` takes
    its peak from it where the kernels load (its value is a timing: not asserted beyond being one)."""
    from timm_convmixer.cli.bench_engines import measured_peak
    gflops = cpu_kernels.fma_peak_gflops(per_thread=20_000, repeats=2)
    assert 0 < gflops < float('inf')
    with pytest.raises(RuntimeError, match='per_thread and repeats must be positive'):
        cpu_kernels.fma_peak_gflops(per_thread=0)
    peak = measured_peak()
    assert peak['method'].startswith('measured fp32 FMA peak') and peak['gflops'] > 0


def test_bad_arguments_are_named(kernels):
    x, weight, bias, scale = _inputs(1, 16, 6, 6, 3)
    taps = weight.reshape(16, 9).t().contiguous()
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match='x must be a 4-d float32 or bfloat16 CPU tensor'):
        cpu_kernels.dw_block(x.double(), taps, bias, scale, 3, 'relu', out)
    with pytest.raises(RuntimeError, match='x must be channels_last'):
        cpu_kernels.dw_block(x.contiguous(), taps, bias, scale, 3, 'relu', out)
    with pytest.raises(RuntimeError, match='expected taps of 9 x 16'):
        cpu_kernels.dw_block(x, taps[:4], bias, scale, 3, 'relu', out)
    wrong_out = "out must be a channels_last CPU tensor of x's shape, in x's dtype or float32"
    with pytest.raises(RuntimeError, match=wrong_out):
        cpu_kernels.dw_block(x, taps, bias, scale, 3, 'relu', out[:, :8])
    with pytest.raises(RuntimeError, match=wrong_out):
        cpu_kernels.dw_block(x, taps, bias, scale, 3, 'relu', out.bfloat16())  # fp32 in, bf16 out
    with pytest.raises(RuntimeError, match=wrong_out):
        cpu_kernels.dw_block(x.bfloat16(), taps, bias, scale, 3, 'relu', out.double())
    with pytest.raises(RuntimeError, match='out must not be x'):
        cpu_kernels.dw_block(x, taps, bias, scale, 3, 'relu', x)
    with pytest.raises(RuntimeError, match='give both in_scale and in_shift, or neither'):
        cpu_kernels._ops.dw_block(x, taps, bias, scale, 3, 1, out, scale, None)
    with pytest.raises(RuntimeError, match='in_scale and in_shift must be contiguous float32 CPU tensors of 16'):
        cpu_kernels.dw_block(x, taps, bias, scale, 3, 'relu', out, in_affine=(scale[:8], bias[:8]))


@pytest.mark.parametrize('shape', [(2, 20, 7, 9, 5), (1, 32, 6, 6, 8), (1, 24, 5, 27, 8), (1, 16, 3, 12, 9),
                                   (1, 16, 4, 4, 2)], ids=lambda s: 'x'.join(map(str, s)))
def test_bare_convolution_and_its_transpose_for_training(shape, kernels):
    """``residual=False``, what the lean training block runs on a CPU (:mod:`timm_convmixer.fast.lean_cpu`): the
    bare convolution with its bias, and, with the window turned and padded ``k // 2`` before, the transposed
    convolution that carries an output gradient to the input: both as autograd computes them in float64, odd and
    even windows, every border; an infinite gradient gives infinities where autograd's do, no NaN (a zero-padded
    window would multiply it by zero); an addend (the gradient past the convolution) added as the output is stored. A
    bf16 input, a padding other than "same" with the residual and an addend unlike the input are refused by name."""
    from timm_convmixer.fast import lean_cpu
    x, weight, bias, _ = _inputs(*shape, seed=5)
    k = weight.shape[-1]
    z = lean_cpu._depthwise(x, cpu_kernels.dw_taps(weight), bias, k)
    x64 = x.double().requires_grad_()
    z64 = F.conv2d(x64, weight.double(), bias.double(), padding='same', groups=x.shape[1])
    torch.testing.assert_close(z.double(), z64, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(z)
    taps, pad = lean_cpu._transposed(weight)
    assert pad == k // 2
    grad_x = lean_cpu._depthwise(grad, taps, None, k, pad)
    torch.testing.assert_close(grad_x.double(), torch.autograd.grad(z64, x64, grad.double(), retain_graph=True)[0],
                               rtol=1e-5, atol=1e-5)
    # plus what passed the convolution (the block's residual), added as it stores: the bits of an add after it,
    # into a buffer of its own or into the addend itself
    passed = torch.randn_like(x)
    added = lean_cpu._depthwise(grad, taps, None, k, pad, addend=passed)
    assert torch.equal(added, grad_x + passed)
    in_place = passed.clone()
    cpu_kernels.dw_block(grad, taps, torch.zeros_like(bias), torch.ones_like(bias), k, 'identity', in_place,
                         residual=False, pad=pad, addend=in_place)
    assert torch.equal(in_place, added)
    grad[0, 0, -1, -1] = float('inf')  # the far corner: where an even window's extra padding lies
    grad_x = lean_cpu._depthwise(grad, taps, None, k, pad)
    expected = torch.autograd.grad(z64, x64, grad.double())[0]
    assert not grad_x.isnan().any() and torch.equal(grad_x.isinf(), expected.isinf()) and grad_x.isinf().any()
    ones = torch.ones_like(bias)
    with pytest.raises(RuntimeError, match='residual=False takes a float32 x'):
        cpu_kernels.dw_block(x.bfloat16(), cpu_kernels.dw_taps(weight), bias, ones, k, 'identity',
                             torch.empty_like(x.bfloat16()), residual=False)
    with pytest.raises(RuntimeError, match='a padding other than "same" takes residual=False'):
        cpu_kernels.dw_block(x, taps, bias, ones, k, 'identity', torch.empty_like(x), pad=(k - 1) // 2 + 1)
    with pytest.raises(RuntimeError, match=f'pad must be below the kernel size {k}, got {k}'):
        cpu_kernels.dw_block(x, taps, bias, ones, k, 'identity', torch.empty_like(x), residual=False, pad=k)
    for addend, residual in ((passed, True), (passed[:, :-1], False), (passed.contiguous(), False)):
        with pytest.raises(RuntimeError, match="an addend takes residual=False and must be a channels_last float32"):
            cpu_kernels.dw_block(x, taps, bias, ones, k, 'identity', torch.empty_like(x), residual=residual,
                                 addend=addend)


# channels in a partial block (20) and whole ones (32); kernels odd and even; images where the window reaches past
# every border
@pytest.mark.parametrize('shape', [(2, 20, 7, 9, 5), (1, 32, 6, 6, 8), (1, 16, 3, 12, 9)],
                         ids=lambda s: 'x'.join(map(str, s)))
def test_input_affine_is_applied_as_the_input_is_read(shape, kernels):
    """With ``in_affine = (s, t)`` the kernel computes the block on ``s * a + t``, zero padding and all (the
    previous block's pointwise BatchNorm, carried instead of written out): as if that tensor had been written first,
    to float32 rounding."""
    a, weight, bias, scale = _inputs(*shape, seed=2)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    c, k = weight.shape[0], weight.shape[-1]
    taps = weight.reshape(c, k * k).t().contiguous()
    carried = cpu_kernels.dw_block(a, taps, bias, scale, k, 'gelu', torch.empty_like(a), in_affine=(s, t))
    x = (a.double() * s.double().view(1, -1, 1, 1) + t.double().view(1, -1, 1, 1))
    torch.testing.assert_close(carried.double(), _reference(x, weight, bias, scale, 'gelu'), rtol=1e-5, atol=1e-5)


# a partial vector and block (20 channels), whole blocks (32), one pixel with both; kernels of a strip and not
BF16_DW_SHAPES = [((2, 20, 7, 9, 5), True), ((1, 32, 6, 19, 9), False), ((1, 33, 1, 1, 7), True),
                  ((2, 20, 5, 11, 3), True), ((1, 32, 4, 13, 4), False)]
PAIR_KERNEL_SIZES = (5, 7, 8, 9)  # the strips' sizes: where a bf16 x and out are multiplied in pairs (if the CPU can)


def _bf16_dw_case(shape, affine, seed=4):
    x, weight, bias, scale = _inputs(*shape, seed=seed)
    c = weight.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    in_affine = (torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)) if affine else None
    return x.bfloat16(), weight, bias, scale, in_affine


@pytest.mark.parametrize('shape,affine', BF16_DW_SHAPES, ids=lambda v: 'x'.join(map(str, v))
                         if isinstance(v, tuple) else f'affine={v}')
def test_bfloat16_in_float32_out_is_the_float32_kernel(shape, affine, kernels):
    """bf16 ``x`` with a float32 ``out`` (the compiled path under bf16 autocast on a CPU without native bf16, whose
    GEMM reads float32): widened exactly as read and computed in float32, bit for bit the float32 kernel's output on
    the widened input."""
    x, weight, bias, scale, in_affine = _bf16_dw_case(shape, affine)
    c, k = weight.shape[0], weight.shape[-1]
    taps = weight.reshape(c, k * k).t().contiguous()
    wide = cpu_kernels.dw_block(x.float(), taps, bias, scale, k, 'gelu', torch.empty_like(x, dtype=torch.float32),
                                in_affine)
    read_bf16 = cpu_kernels.dw_block(x, taps, bias, scale, k, 'gelu', torch.empty_like(x, dtype=torch.float32),
                                     in_affine)
    assert torch.equal(read_bf16, wide)


@pytest.mark.parametrize('shape,affine', BF16_DW_SHAPES, ids=lambda v: 'x'.join(map(str, v))
                         if isinstance(v, tuple) else f'affine={v}')
def test_bfloat16_in_and_out_is_the_float32_kernel_rounded_once(shape, affine, kernels):
    """bf16 ``x`` and ``out`` where they are not multiplied in pairs (``cpu_hybrid`` under native bf16 autocast at
    other kernel sizes, or on a CPU without AVX512-BF16): computed in float32, rounded to nearest even once as
    stored -- bit for bit the float32 kernel's output on the widened input, rounded by torch."""
    x, weight, bias, scale, in_affine = _bf16_dw_case(shape, affine)
    c, k = weight.shape[0], weight.shape[-1]
    if k in PAIR_KERNEL_SIZES and cpu_kernels.bf16_dot():
        pytest.skip('multiplied in bf16 pairs on this CPU: test_bfloat16_pairs_are_bf16_operands_summed_in_float32')
    taps = weight.reshape(c, k * k).t().contiguous()
    got = cpu_kernels.dw_block(x, taps, bias, scale, k, 'gelu', torch.empty_like(x), in_affine)
    wide = cpu_kernels.dw_block(x.float(), taps, bias, scale, k, 'gelu', torch.empty_like(x, dtype=torch.float32),
                                in_affine)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, wide.bfloat16())


# every strip size, partial channel blocks (20, 40) and a whole one (48); rows of 37 pixels (strips of 16, 8 and
# single outputs), 9 and 1; images narrower and shorter than the kernel
DW_PAIR_SHAPES = [((2, 20, 7, 9, 5), True), ((1, 48, 6, 37, 9), False), ((1, 33, 1, 1, 7), True),
                  ((2, 40, 18, 37, 8), True), ((1, 16, 3, 12, 9), False), ((2, 48, 16, 16, 5), False),
                  ((1, 20, 5, 4, 8), False)]


@pytest.mark.parametrize('shape,affine', DW_PAIR_SHAPES, ids=lambda v: 'x'.join(map(str, v))
                         if isinstance(v, tuple) else f'affine={v}')
def test_bfloat16_pairs_are_bf16_operands_summed_in_float32(shape, affine, kernels):
    """bf16 ``x`` and ``out`` at the strips' kernel sizes on a CPU with AVX512-BF16: the taps rounded to bf16 (as
    eager autocast's convolution rounds its weight) and multiplied in pairs by ``vdpbf16ps``, the input affine
    rounded to bf16 as read; the rest in float32 and the output rounded once. So the output is the float64 block
    on those bf16 values, to float32 summation and one bf16 rounding (a neighbour of a tie may round either way)."""
    _needs_bf16_dot()
    x, weight, bias, scale, in_affine = _bf16_dw_case(shape, affine, seed=6)
    c, k = weight.shape[0], weight.shape[-1]
    taps = weight.reshape(c, k * k).t().contiguous()
    got = cpu_kernels.dw_block(x, taps, bias, scale, k, 'gelu', torch.empty_like(x), in_affine)
    read = x.double()
    if in_affine is not None:
        s, t = (v.double().view(1, -1, 1, 1) for v in in_affine)
        read = (read * s + t).bfloat16().double()
    want = _reference(read, weight.bfloat16().double(), bias, scale, 'gelu')
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-5)


def _weight_grad_reference(x, grad, k):
    """The depthwise "same" conv's weight and bias gradients by autograd in float64."""
    c = x.shape[1]
    weight = torch.zeros(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(x.double(), weight, bias, padding='same', groups=c)
    return torch.autograd.grad(out, (weight, bias), grad.double())


# partial channel blocks (13, 20, 40), every compiled kernel size (5, 7, 8, 9) and the generic loop (1, 3, 4),
# images narrower or shorter than the kernel, non-square images
WEIGHT_GRAD_SHAPES = [(2, 13, 7, 9, 3), (1, 20, 5, 4, 8), (3, 24, 6, 6, 5), (2, 40, 9, 11, 9), (1, 17, 3, 3, 1),
                      (2, 16, 4, 4, 7), (1, 8, 3, 2, 9), (2, 32, 5, 8, 4)]


@pytest.mark.parametrize('shape', WEIGHT_GRAD_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_depthwise_weight_grad_matches_autograd_in_float64(shape, kernels):
    n, c, h, w, k = shape
    g = torch.Generator().manual_seed(7)
    x, grad = (torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2))
    grad_w, grad_b = cpu_kernels.dw_weight_grad(x, grad, k)
    ref_w, ref_b = _weight_grad_reference(x, grad, k)
    assert grad_w.shape == (c, 1, k, k) and grad_b.shape == (c,) and grad_w.dtype == torch.float32
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-5 * ref_w.abs().max().item())
    torch.testing.assert_close(grad_b.double(), ref_b, rtol=1e-5, atol=1e-5 * ref_b.abs().max().item())


def test_depthwise_weight_grad_same_bits_on_any_thread_count(kernels):
    """Threads split the channel blocks; each block's sums run over the images, rows and taps in one order."""
    g = torch.Generator().manual_seed(3)
    x, grad = (torch.randn(3, 72, 10, 12, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(cpu_kernels.dw_weight_grad(x, grad, 7))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(outs[0], out))


def test_depthwise_weight_grad_bad_arguments_are_named(kernels):
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match='x must be a 4-d float32 CPU tensor'):
        cpu_kernels.dw_weight_grad(x.double(), x, 3)
    with pytest.raises(RuntimeError, match="grad must be a float32 CPU tensor of x's shape"):
        cpu_kernels.dw_weight_grad(x, x[:, :4], 3)
    with pytest.raises(RuntimeError, match='x and grad must be channels_last'):
        cpu_kernels.dw_weight_grad(x, x.contiguous(), 3)
    with pytest.raises(RuntimeError, match='kernel size must be 1..64, got 0'):
        cpu_kernels.dw_weight_grad(x, x, 0)


def _norm_reference(t, act, weight, bias, mask, residual, grad):
    """``residual + mask * batch_norm(act(t))`` on batch statistics, and its gradients wrt (t, weight, bias), by
    autograd in float64."""
    t, weight, bias = (v.double().requires_grad_() for v in (t, weight, bias))
    y = F.batch_norm(ACTS[act](t), None, None, weight, bias, True, 0., 1e-5)
    out = residual.double() + y * mask.double().view(-1, 1, 1, 1)
    return (out.detach(),) + torch.autograd.grad(out, (t, weight, bias), grad.double())


# partial vectors of channels (13, 40), chunks and runs of rows cut short (35, 54, 1020 rows), one image per
# drop-path factor over several chunks, a single row per image
NORM_SHAPES = [(3, 13, 5, 7), (4, 40, 9, 6), (2, 64, 4, 4), (5, 24, 1, 1), (1, 16, 30, 34)]


@pytest.mark.parametrize('act', ACTS)
@pytest.mark.parametrize('shape', NORM_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_training_norm_matches_autograd_in_float64(shape, act, kernels):
    g = torch.Generator().manual_seed(11)
    t, residual, grad = ((torch.randn(shape, generator=g) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
                         for _ in range(3))
    c = shape[1]
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    mask = torch.tensor([1.25, 0., 2., 1.25, 1.25][:shape[0]])  # drop path's factors: 1 / keep or 0
    ref_out, ref_t, ref_w, ref_b = _norm_reference(t, act, weight, bias, mask, residual, grad)

    mean, var = cpu_kernels.bn_act_stats(t, act)
    a = ACTS[act](t.double())
    torch.testing.assert_close(mean, a.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, a.var((0, 2, 3), unbiased=False), rtol=1e-6, atol=1e-6)
    invstd = (var + 1e-5).rsqrt()
    scale, shift = weight * invstd, bias - mean * weight * invstd
    out = cpu_kernels.bn_act_apply(t, act, scale.float(), shift.float(), mask, residual, torch.empty_like(t))
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 * ref_out.abs().max().item())
    grad_t, grad_w, grad_b, sums = cpu_kernels.bn_act_backward(grad, t, act, mean.float(), invstd.float(), weight,
                                                                mask, out_sums=True)
    assert grad_t.is_contiguous(memory_format=torch.channels_last) and grad_t.dtype == torch.float32
    for got, ref in ((grad_t, ref_t), (grad_w, ref_w), (grad_b, ref_b)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the bias gradient of a convolution that made t (0 but for the activation's slope: held to the terms' size)
    torch.testing.assert_close(sums.double(), ref_t.sum((0, 2, 3)), rtol=0, atol=1e-5 * ref_t.abs().sum().item())
    # the sums ride along on the same pass: the gradients themselves are the same bits without them
    alone = cpu_kernels.bn_act_backward(grad, t, act, mean.float(), invstd.float(), weight, mask)
    assert alone[3] is None and all(torch.equal(a, b) for a, b in zip(alone[:3], (grad_t, grad_w, grad_b)))


def test_training_norm_without_mask_residual_or_weight(kernels):
    """The optional operands left out: ``scale * act(t) + shift`` and the affine-free norm's gradient."""
    g = torch.Generator().manual_seed(5)
    t, grad = (torch.randn(2, 20, 6, 5, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2))
    scale, shift = torch.randn(20, generator=g), torch.randn(20, generator=g)
    out = cpu_kernels.bn_act_apply(t, 'gelu', scale, shift, None, None, torch.empty_like(t))
    expected = F.gelu(t.double()) * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    mean, var = cpu_kernels.bn_act_stats(t, 'silu')
    invstd = (var + 1e-5).rsqrt()
    ref = _norm_reference(t, 'silu', torch.ones(20), torch.zeros(20), torch.ones(2), torch.zeros_like(t), grad)
    grad_t, _, grad_b, _ = cpu_kernels.bn_act_backward(grad, t, 'silu', mean.float(), invstd.float(), None, None)
    torch.testing.assert_close(grad_t.double(), ref[1], rtol=1e-5, atol=1e-5 * ref[1].abs().max().item())
    torch.testing.assert_close(grad_b.double(), ref[3], rtol=1e-5, atol=1e-5 * ref[3].abs().max().item())


def _assert_rounded_once(out, wide):
    """``out`` is channels_last bfloat16 and holds float32 ``wide`` rounded to nearest even once, as ``.bfloat16()``
    rounds it: within half a bf16 ulp of it, and the same bits but where the float32 sums differ by an ulp."""
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - wide).abs().le(wide.abs() * 2 ** -8).all()
    assert (out == wide.bfloat16()).float().mean() > 0.99  # the same rounding (a float32 ulp apart at most)


@pytest.mark.parametrize('act', ['relu', 'gelu'])
def test_training_norm_apply_rounds_a_bfloat16_out_once(act, kernels):
    """A bfloat16 ``out`` (the lean block's GEMM operand under bf16 autocast) holds the float32 result rounded to
    nearest even once, as ``.bfloat16()`` rounds it: within half a bf16 ulp of it, partial vectors of channels
    included."""
    g = torch.Generator().manual_seed(7)
    t, residual = (torch.randn(3, 40, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
                   for _ in range(2))
    scale, shift, mask = torch.randn(40, generator=g), torch.randn(40, generator=g), torch.tensor([1.25, 0., 2.])
    wide = cpu_kernels.bn_act_apply(t, act, scale, shift, mask, residual, torch.empty_like(t))
    out = cpu_kernels.bn_act_apply(t, act, scale, shift, mask, residual, torch.empty_like(t, dtype=torch.bfloat16))
    _assert_rounded_once(out, wide)


def test_training_norm_backward_rounds_a_bfloat16_out_once(kernels):
    """A bfloat16 ``out`` (the pointwise GEMMs' operand under bf16 autocast) holds the float32 gradient rounded to
    nearest even once; the weight's and bias's gradients and the column sums are the float32 ones, bit for bit."""
    g = torch.Generator().manual_seed(8)
    t, grad = (torch.randn(3, 40, 5, 6, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2))
    mean, var = cpu_kernels.bn_act_stats(t, 'gelu')
    args = (grad, t, 'gelu', mean.float(), (var + 1e-5).rsqrt().float(), torch.randn(40, generator=g),
            torch.tensor([1.25, 0., 2.]))
    wide = cpu_kernels.bn_act_backward(*args, out_sums=True)
    out = cpu_kernels.bn_act_backward(*args, out=torch.empty_like(t, dtype=torch.bfloat16), out_sums=True)
    _assert_rounded_once(out[0], wide[0])
    assert all(torch.equal(a, b) for a, b in zip(out[1:], wide[1:]))


def test_training_norm_same_bits_on_any_thread_count(kernels):
    """Threads split chunks of rows; the chunks' sums are added in one order whatever the thread count."""
    g = torch.Generator().manual_seed(3)
    t, grad = (torch.randn(3, 72, 10, 12, generator=g).contiguous(memory_format=torch.channels_last)
               for _ in range(2))
    weight, mask = torch.randn(72, generator=g), torch.tensor([1., 0., 2.])
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            mean, var = cpu_kernels.bn_act_stats(t, 'gelu')
            outs.append((mean, var) + cpu_kernels.bn_act_backward(
                grad, t, 'gelu', mean.float(), (var + 1e-5).rsqrt().float(), weight, mask, out_sums=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(outs[0], out))


def test_training_norm_bad_arguments_are_named(kernels):
    t = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    v = torch.ones(8)
    with pytest.raises(RuntimeError, match='bn_act_stats: expected a 4-d float32 CPU tensor'):
        cpu_kernels.bn_act_stats(t.double(), 'relu')
    with pytest.raises(RuntimeError, match='bn_act_stats: expected a channels_last tensor'):
        cpu_kernels.bn_act_stats(t.contiguous(), 'relu')
    with pytest.raises(RuntimeError, match='bn_act_stats: t is empty'):
        cpu_kernels.bn_act_stats(t[:0], 'relu')
    with pytest.raises(RuntimeError, match="bn_act_apply: out must be a channels_last float32 or bfloat16 tensor of "):
        cpu_kernels.bn_act_apply(t, 'relu', v, v, None, None, torch.empty_like(t).contiguous())
    with pytest.raises(RuntimeError, match="bn_act_apply: out must be a channels_last float32 or bfloat16 tensor of "):
        cpu_kernels.bn_act_apply(t, 'relu', v, v, None, None, torch.empty_like(t, dtype=torch.float16))
    with pytest.raises(RuntimeError, match='bn_act_apply: out must not be t'):
        cpu_kernels.bn_act_apply(t, 'relu', v, v, None, None, t)
    with pytest.raises(RuntimeError, match='bn_act_apply: mask must hold 2 contiguous float32 values'):
        cpu_kernels.bn_act_apply(t, 'relu', v, v, torch.ones(3), None, torch.empty_like(t))
    with pytest.raises(RuntimeError, match='bn_act_backward: weight must hold 8 contiguous float32 values'):
        cpu_kernels.bn_act_backward(t, t, 'relu', v, v, torch.ones(8, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="bn_act_backward: grad must be a channels_last float32 tensor of t's shape"):
        cpu_kernels.bn_act_backward(t[:1], t, 'relu', v, v, None, None)
    with pytest.raises(RuntimeError, match="bn_act_backward: out must be a channels_last float32 or bfloat16 tensor"):
        cpu_kernels.bn_act_backward(t, t, 'relu', v, v, None, None, out=t[:1])
    with pytest.raises(RuntimeError, match="bn_act_backward: out must be a channels_last float32 or bfloat16 tensor"):
        cpu_kernels.bn_act_backward(t, t, 'relu', v, v, None, None, out=torch.empty_like(t, dtype=torch.float16))
    with pytest.raises(RuntimeError, match='bn_act_backward: out must not be t'):
        cpu_kernels.bn_act_backward(t.clone(), t, 'relu', v, v, None, None, out=t)


def _pw_inputs(n, c_in, c_out, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, generator=g) / max(c_in, 1) ** 0.5
    bias, scale, shift = (torch.randn(c_out, generator=g) for _ in range(3))
    return u, weight, bias, scale, shift


def _pw_kernel(u, weight, bias, scale, shift, act):
    out = torch.empty(u.shape[0], weight.shape[0], *u.shape[2:]).contiguous(memory_format=torch.channels_last)
    return cpu_kernels.pw_block(u, cpu_kernels.pw_pack(weight), bias, scale, shift, act, out)


def _pw_reference(u, weight, bias, scale, shift, act):
    """The block's pointwise half as eager computes it (conv 1x1, activation, BatchNorm as its affine), in float64."""
    u, weight, bias, scale, shift = (t.double() for t in (u, weight, bias, scale, shift))
    z = F.conv2d(u, weight[:, :, None, None], bias)
    return ACTS[act](z) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


# (n, c_in, c_out, h, w): rows short of a tile (6) and of a chunk, output channels short of a panel (16 on AVX2, 32
# on AVX-512) and several panels, one input channel, a ConvMixer-sized 256 x 256 at 2 x 12 x 12, and input channels
# wide enough to be taken in K slices (over 1024) with a short last one (256 a slice on AVX2, 128 on AVX-512),
# output channels in several work items with a short last one (128 on AVX2, 256 on AVX-512), rows in full 96-row
# chunks and a short last one
PW_SHAPES = [(1, 3, 5, 1, 1), (2, 17, 33, 5, 7), (1, 64, 16, 7, 7), (3, 1, 40, 4, 4),
             (2, 256, 256, 12, 12), (1, 24, 96, 1, 49), (1, 1100, 300, 28, 29)]


@pytest.mark.parametrize('shape', PW_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_pointwise_matches_eager_in_float64(shape, kernels):
    args = _pw_inputs(*shape)
    out = _pw_kernel(*args, 'gelu')
    assert out.shape == (shape[0], shape[2], *shape[3:]) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), _pw_reference(*args, 'gelu'), rtol=1e-5, atol=2e-5)


def test_pointwise_without_input_channels_is_the_epilogue_of_zero(kernels):
    """No input channels: every sum is zero, so each output is the epilogue of the bias alone (this once looped
    forever, stepping K by a zero-wide slice)."""
    u, weight, bias, scale, shift = _pw_inputs(1, 0, 20, 3, 4)
    out = _pw_kernel(u, weight, bias, scale, shift, 'gelu')
    want = F.gelu(bias.double()) * scale.double() + shift.double()
    torch.testing.assert_close(out.double(), want.view(1, -1, 1, 1).expand_as(out), rtol=1e-5, atol=2e-5)


def test_pointwise_same_bits_on_any_thread_count(kernels):
    """How rows are split into chunks follows the thread count; each output's sum runs over K in the same order
    whatever the split, so the result does not depend on it."""
    args = _pw_inputs(1, 1100, 300, 28, 29, seed=2)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_pw_kernel(*args, 'relu'))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize('act', ACTS)
def test_pointwise_every_activation(act, kernels):
    u, weight, bias, scale, shift = _pw_inputs(2, 40, 24, 5, 3, seed=1)
    u = u * 4  # reach GELU's and SiLU's tails
    torch.testing.assert_close(_pw_kernel(u, weight, bias, scale, shift, act).double(),
                               _pw_reference(u, weight, bias, scale, shift, act), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize('shape', [(2, 17, 33, 5, 7), (1, 64, 16, 7, 7)], ids=lambda s: 'x'.join(map(str, s)))
def test_pointwise_bfloat16_out_is_the_float32_output_rounded_once(shape, kernels):
    """A bf16 ``out`` (the compiled path under bf16 autocast without native bf16): the float32 result rounded to
    nearest even as it is stored, bit for bit torch's rounding of the float32 output; output channels in whole
    vectors and a partial one (33), rounded in registers and through the partial store."""
    args = _pw_inputs(*shape, seed=5)
    u, weight = args[0], args[1]
    wide = _pw_kernel(*args, 'gelu')
    out = torch.empty(u.shape[0], weight.shape[0], *u.shape[2:], dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    got = cpu_kernels.pw_block(u, cpu_kernels.pw_pack(weight), *args[2:], 'gelu', out)
    assert got.dtype == torch.bfloat16 and torch.equal(got, wide.bfloat16())


def _needs_bf16_dot():
    if not cpu_kernels.bf16_dot():
        pytest.skip('bf16 pairs need AVX-512 kernels on a CPU with AVX512-BF16')


# PW_SHAPES with an even number of input channels (the pairs' K), and one whose K (1536 / 2 steps) is taken in slices
PW_PAIR_SHAPES = [s for s in PW_SHAPES if s[1] % 2 == 0] + [(1, 1536, 40, 5, 5)]


@pytest.mark.parametrize('shape', PW_PAIR_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_pointwise_bfloat16_pairs_are_exact_products_summed_in_float32(shape, kernels):
    """A bf16 ``u`` with a bf16 weight (the compiled path under native bf16 autocast): every product of bf16
    values is exact in float32, so the result is the float64 GEMM of the same bf16 values to float32 summation
    error, with the epilogue in float32 -- eager autocast's operands, without its bf16 roundings after the conv."""
    _needs_bf16_dot()
    u, weight, bias, scale, shift = _pw_inputs(*shape, seed=7)
    u, weight = u.bfloat16(), weight.bfloat16()
    out = torch.empty(u.shape[0], weight.shape[0], *u.shape[2:]).contiguous(memory_format=torch.channels_last)
    got = cpu_kernels.pw_block(u, cpu_kernels.pw_pack(weight), bias, scale, shift, 'gelu', out)
    torch.testing.assert_close(got.double(), _pw_reference(u, weight, bias, scale, shift, 'gelu'), rtol=1e-5,
                               atol=2e-5)
    rounded = torch.empty_like(out, dtype=torch.bfloat16)  # a bf16 out: that result rounded once, as stored
    cpu_kernels.pw_block(u, cpu_kernels.pw_pack(weight), bias, scale, shift, 'gelu', rounded)
    assert torch.equal(rounded, got.bfloat16())


def test_pointwise_bfloat16_pairs_same_bits_on_any_thread_count(kernels):
    _needs_bf16_dot()
    u, weight, *rest = _pw_inputs(1, 1100, 300, 28, 29, seed=3)
    panels = cpu_kernels.pw_pack(weight.bfloat16())
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = torch.empty(1, 300, 28, 29).contiguous(memory_format=torch.channels_last)
            outs.append(cpu_kernels.pw_block(u.bfloat16(), panels, *rest, 'relu', out))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_pointwise_bfloat16_needs_even_channels_and_the_instruction(kernels):
    """A bf16 GEMM is refused with the reason: on a CPU without AVX512-BF16 always, elsewhere for an odd number of
    input channels or panels of the other dtype."""
    u, weight, bias, scale, shift = _pw_inputs(1, 16, 24, 3, 3)
    out = torch.empty(1, 24, 3, 3).contiguous(memory_format=torch.channels_last)
    if not cpu_kernels.bf16_dot():
        with pytest.raises(RuntimeError, match='a CPU with AVX512-BF16 \\(this one has not\\)'):
            cpu_kernels.pw_pack(weight.bfloat16())
        with pytest.raises(RuntimeError, match='a CPU with AVX512-BF16 \\(this one has not\\)'):
            cpu_kernels.pw_block(u.bfloat16(), cpu_kernels.pw_pack(weight), bias, scale, shift, 'relu', out)
        return
    with pytest.raises(RuntimeError, match='an even number of input channels \\(got 15\\)'):
        cpu_kernels.pw_pack(weight[:, :15].bfloat16())
    with pytest.raises(RuntimeError, match="panels must be pw_pack's output for 16 input channels in u's dtype"):
        cpu_kernels.pw_block(u.bfloat16(), cpu_kernels.pw_pack(weight), bias, scale, shift, 'relu', out)
    with pytest.raises(RuntimeError, match="panels must be pw_pack's output for 16 input channels in u's dtype"):
        cpu_kernels.pw_block(u, cpu_kernels.pw_pack(weight.bfloat16()), bias, scale, shift, 'relu', out)


def test_pointwise_bad_arguments_are_named(kernels):
    u, weight, bias, scale, shift = _pw_inputs(1, 16, 24, 3, 3)
    panels = cpu_kernels.pw_pack(weight)
    out = torch.empty(1, 24, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match='weight must be a 2-d'):
        cpu_kernels.pw_pack(weight[:, :, None])
    with pytest.raises(RuntimeError, match='u must be a 4-d float32 or bfloat16 CPU tensor'):
        cpu_kernels.pw_block(u.double(), panels, bias, scale, shift, 'relu', out)
    with pytest.raises(RuntimeError, match='u must be channels_last'):
        cpu_kernels.pw_block(u.contiguous(), panels, bias, scale, shift, 'relu', out)
    with pytest.raises(RuntimeError, match="panels must be pw_pack's output for 16 input channels"):
        cpu_kernels.pw_block(u, cpu_kernels.pw_pack(weight[:, :8]), bias, scale, shift, 'relu', out)
    with pytest.raises(RuntimeError, match='output channels, out has 48'):
        cpu_kernels.pw_block(u, panels, bias, scale, shift, 'relu', torch.cat([out, out], 1))
    wrong_out = "out must be a channels_last float32 or bfloat16 CPU tensor of u's batch"
    with pytest.raises(RuntimeError, match=wrong_out):
        cpu_kernels.pw_block(u, panels, bias, scale, shift, 'relu', out.contiguous())
    with pytest.raises(RuntimeError, match=wrong_out):
        cpu_kernels.pw_block(u, panels, bias, scale, shift, 'relu', out.double())
    with pytest.raises(RuntimeError, match='bias, scale and shift must be'):
        cpu_kernels.pw_block(u, panels, bias[:3], scale, shift, 'relu', out)
    with pytest.raises(RuntimeError, match='out must not be u'):
        square = cpu_kernels.pw_pack(weight[:16])
        cpu_kernels.pw_block(u, square, bias[:16], scale[:16], shift[:16], 'relu', u)


def test_outputs_are_never_the_reused_buffer(small_model, run_counted, kernels):
    """The compiled path reuses one buffer for its depthwise half and pools its block outputs' memory: an output
    must survive later calls while anyone holds it, itself or a view of it, and every block of
    ``forward_intermediates`` (all held at once) must keep its own values."""
    model = small_model(dim=32, depth=3, kernel_size=7, randomize={})
    x1, x2, x3 = torch.randn(3, 2, 3, 28, 28)
    with torch.no_grad():
        first, paths = run_counted(model.forward_features, x1, backend='cpu_compiled')
        view = run_counted(model.forward_features, x2, backend='cpu_compiled')[0][:, :8]
        kept_first, kept_view = first.clone(), view.clone()
        for _ in range(2):
            run_counted(model.forward_features, x3, backend='cpu_compiled')
        with fast.use_backend('cpu_compiled'):
            feats = model.forward_intermediates(x3, intermediates_only=True)
        with fast.use_backend('eager'):
            want = model.forward_intermediates(x3, intermediates_only=True)
    assert paths == {'cpu_compiled': 3}
    assert torch.equal(first, kept_first) and torch.equal(view, kept_view)
    assert len({f.data_ptr() for f in feats}) == len(feats)
    for got, ref in zip(feats, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_released_outputs_memory_is_reused(kernels):
    """What the output pool is for: once nobody holds an output, the next block output of that shape gets its
    memory instead of fresh pages; a held one is never handed out, and outputs are plain tensors, not views."""
    fast_cpu.clear_cache()
    u = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    a, b = (fast_cpu.output_buffer(u.shape, u.dtype) for _ in range(2))
    assert a._base is None and a.is_contiguous(memory_format=torch.channels_last) and a.shape == u.shape
    held, released = a.data_ptr(), b.data_ptr()
    del b
    c = fast_cpu.output_buffer(u.shape, u.dtype)
    assert c.data_ptr() == released
    d = fast_cpu.output_buffer(u.shape, u.dtype)  # both pooled buffers held: a fresh tensor
    assert d.data_ptr() not in (held, released)
    assert cpu_kernels.storage_use_count(torch.empty(3)) == 1
    assert cpu_kernels.storage_use_count(c) == 2  # c and the pool's buffer
    # a bf16 output of an fp32 u (the compiled path under bf16 autocast): a pool of its own dtype, reused likewise
    e = fast_cpu.output_buffer(u.shape, torch.bfloat16)
    assert e.dtype == torch.bfloat16 and e.shape == u.shape and e.is_contiguous(memory_format=torch.channels_last)
    released = e.data_ptr()
    del e
    assert fast_cpu.output_buffer(u.shape, torch.bfloat16).data_ptr() == released
    fast_cpu.clear_cache()


def test_training_pool_grows_to_what_is_held_and_gives_back_what_it_no_longer_reaches(kernels):
    """The lean training block's pool (uncapped): as many buffers as are held at once, reused once released; when
    far fewer are held for long enough (TRIM_AFTER hand-outs per pooled buffer), the unused ones go back, never one
    someone holds; release_buffers gives back all."""
    fast_cpu.release_buffers()
    shape = (2, 16, 4, 4)
    pool = lambda: fast_cpu._outputs[('train', shape, torch.float32)]  # noqa: E731
    held = [fast_cpu.output_buffer(shape, torch.float32, user='train') for _ in range(5)]
    assert len(pool()) == 5 and len({t.data_ptr() for t in held}) == 5
    kept = held[3].fill_(7.)
    del held
    for _ in range(2 * fast_cpu.TRIM_AFTER * 5):  # the first window still saw five held: the second trims
        t = fast_cpu.output_buffer(shape, torch.float32, user='train').fill_(-1.)
        assert t.data_ptr() != kept.data_ptr()
        del t
    assert len(pool()) == 1 and bool((kept == 7.).all())
    fast_cpu.release_buffers()
    assert ('train', shape, torch.float32) not in fast_cpu._outputs


def test_stem_output_has_its_own_buffer(small_model, kernels):
    """The stem's output, which the model's forward holds while the blocks run, comes from a pool of its own: every
    block's output is still one of the blocks' two pooled buffers (held by the output and the pool), and the next
    stem call, its last output released, reuses the stem's buffer."""
    fast_cpu.clear_cache()
    model = small_model(dim=16, depth=4, kernel_size=3, patch_size=2, randomize={})
    x = torch.randn(2, 3, 16, 16)
    holders = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: holders.append(cpu_kernels.storage_use_count(o)))
    with torch.no_grad(), fast.use_backend('cpu_compiled'):
        stem_out = model.stem(x)
        model.blocks(stem_out)  # the stem's output held throughout, as forward_features holds it
        stem_ptr = stem_out.data_ptr()
        assert cpu_kernels.storage_use_count(stem_out) == 2
        del stem_out
        assert model.stem(x).data_ptr() == stem_ptr
    assert holders == [2, 2, 2, 2]
    fast_cpu.clear_cache()


def test_threads_get_their_own_buffers(small_model, kernels):
    """Two threads running the compiled path at once (same shapes, so the same buffer if it were shared)."""
    model = small_model(dim=32, depth=4, kernel_size=9, randomize={})
    inputs = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        expected = [model(x) for x in inputs]  # auto in the test session: any path, checked against eager
    results, errors = [None, None], []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    results[i] = _compiled_forward(model, inputs[i])
        except Exception as e:  # noqa: BLE001 -- reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _compiled_forward(model, x):
    """``model(x)`` with every block on the compiled path, called the way ``MixerBlock.forward`` calls it."""
    x = model.stem(x)
    for block in model.blocks:
        x = fast_cpu.block_forward(block_parts(block), x, 'cpu_compiled')
    return model.forward_head(x)


def test_no_build_when_asked_not_to(run_python):
    """TIMM_CONVMIXER_CPU_BUILD=0: nothing is compiled, the compiled path declines, auto weighs oneDNN's path only
    (the stem's fast path, our GEMM, is not offered, in fp32 or bf16 autocast), ``build()`` says why it cannot, and
    ``bench --engines`` falls back to the sgemm yardstick for the CPU's peak."""
    code = '''
        import warnings, torch, timm, timm_convmixer
        from timm_convmixer import fast
        from timm_convmixer.fast import checked, cpu_kernels
        warnings.simplefilter('ignore')
        model = timm.create_model('convmixer_256_8_ks5_p2', depth=2, dim=16).eval()
        x = torch.randn(1, 3, 16, 16)
        with torch.no_grad():
            with fast.use_backend('cpu_compiled'):
                model(x)
            print(dict(fast.counters))
            model(x)
            with torch.autocast('cpu', dtype=torch.bfloat16):  # asks whether our GEMM would multiply bf16 pairs
                model(x)
        print(sorted({r['fused_path'] for r in checked.decision_records()}))
        try:
            cpu_kernels.build()
        except RuntimeError as e:
            print(e)
        from timm_convmixer.cli.bench_engines import measured_peak
        peak = measured_peak()
        print(peak['method'].split(' (')[0], peak['gflops'] > 0)
    '''
    out = run_python(code=code, env={cpu_kernels.BUILD_ENV_VAR: '0'}).stdout.strip().splitlines()
    assert out[-4:] == ["{'eager': 2}", "['cpu']",
                        'timm_convmixer: the CPU kernels are unavailable: TIMM_CONVMIXER_CPU_BUILD=0',
                        'measured sgemm peak True']


def test_failed_build_warns_once_and_falls_back(run_python, tmp_path):
    """A build that fails (here: no compiler where CXX points, an empty extension cache) warns once, naming the
    failure, and the model runs on oneDNN's path (the plain stem) with the same output as the plain modules."""
    code = '''
        import warnings, torch, timm, timm_convmixer
        from timm_convmixer import fast
        from timm_convmixer.fast import checked, cpu_kernels
        model = timm.create_model('convmixer_256_8_ks5_p2', depth=2, dim=16).eval()
        x = torch.randn(1, 3, 16, 16)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter('always')
            out = model(x)
            model(x)
            with fast.use_backend('eager'):
                ref = model(x)
        failed = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(len(failed), 'could not build its CPU kernels' in failed[0])
        print(sorted({r['fused_path'] for r in checked.decision_records()}), torch.allclose(out, ref, atol=1e-5))
        print(cpu_kernels.load() is None, cpu_kernels.build_error() is not None)
    '''
    env = {'CXX': str(tmp_path / 'no-such-compiler'), 'TORCH_EXTENSIONS_DIR': str(tmp_path / 'extensions')}
    out = run_python(code=code, env=env, unset=[cpu_kernels.BUILD_ENV_VAR]).stdout.strip().splitlines()
    assert out[-3:] == ['1 True', "['cpu'] True", 'True True']


def test_kernel_size_beyond_the_window_limit_declines(small_model, run_counted, kernels):
    """A kernel wider than the compiled kernel's limit is offered to oneDNN's path only."""
    model = small_model(dim=16, depth=1, kernel_size=cpu_kernels.MAX_KERNEL_SIZE + 1, randomize={})
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        _, paths = run_counted(model, x, backend='cpu_compiled')
        assert fast_cpu.paths(block_parts(model.blocks[0]), model.stem(x)) == ('cpu',)
    assert paths == {'eager': 1}


def _script(run_python, tmp_path, name, *args):
    """Run ``benchmarks/<name>.py`` on convmixer_256_8_ks5_p2 with ``args``; its JSON document and that model's
    results. Every script's document names this CPU's vector flags."""
    import json
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / f'{name}.json'
    run_python(os.path.join(repo, 'benchmarks', f'{name}.py'), '--models', 'convmixer_256_8_ks5_p2', *args,
               '--out', out)
    doc = json.loads(out.read_text())
    assert 'cpu_flags' in doc['hardware']
    return doc, doc['results']['convmixer_256_8_ks5_p2']


def test_pointwise_benchmark_script(run_python, tmp_path, kernels):
    """``benchmarks/cpu_pointwise.py`` end to end on its smallest shape: checked output, all three timed, and the
    bf16 pair where this CPU runs it."""
    _, res = _script(run_python, tmp_path, 'cpu_pointwise', '--rounds', '1')
    bf16 = cpu_kernels.bf16_dot() and fast_cpu.native_bf16()
    assert res['max_rel_error'] <= 1e-5 and set(res['gflop_s']) == {'ours', 'onednn', 'sgemm'} | (
        {'ours_bf16', 'onednn_bf16'} if bf16 else set())
    assert all(v > 0 for v in res['gflop_s'].values())
    assert not bf16 or res['bf16_max_rel_error'] <= 2 ** -8


def test_paths_benchmark_script(run_python, tmp_path, kernels):
    """``benchmarks/cpu_paths.py`` end to end on a one-block model: every path forced ran every block and matched
    eager, all timed, the ratios are those of the medians."""
    doc, res = _script(run_python, tmp_path, 'cpu_paths', '--depth', '1', '--rounds', '2')
    paths = ('eager', 'cpu', 'cpu_compiled', 'cpu_hybrid')
    assert set(res['median_ms']) == set(paths) and all(len(res['times_ms'][p]) == 2 for p in paths)
    assert all(res['max_rel_err'][p] <= 1e-4 for p in paths) and res['max_rel_err']['eager'] == 0
    ms = res['median_ms']
    assert res['fastest'] == min(ms, key=ms.get)
    assert res['hybrid_over']['cpu'] == pytest.approx(ms['cpu'] / ms['cpu_hybrid'], rel=1e-2)
    assert doc['depth'] == 1


def test_paths_benchmark_script_under_bf16_autocast(run_python, tmp_path, kernels):
    """``benchmarks/cpu_paths.py --bf16``: where the CPU has native bf16 every path ran under autocast, within bf16
    precision of eager fp32; elsewhere it refuses with the reason."""
    if not fast_cpu.native_bf16():
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = run_python(os.path.join(repo, 'benchmarks', 'cpu_paths.py'), '--bf16', '--depth', '1', check=False)
        assert proc.returncode != 0 and 'this CPU has no native bf16' in proc.stderr
        return
    doc, res = _script(run_python, tmp_path, 'cpu_paths', '--bf16', '--depth', '1', '--rounds', '1')
    assert doc['bf16'] and res['dtype'] == 'bf16 autocast'
    assert set(res['median_ms']) == {'eager', 'cpu', 'cpu_compiled', 'cpu_hybrid'}
    assert all(0 <= err <= 5e-2 for err in res['max_rel_err'].values())


def test_depthwise_benchmark_script(run_python, tmp_path, kernels):
    """``benchmarks/cpu_depthwise.py`` end to end on one shape: checked output, all three timed, the ratio is that of
    the medians."""
    _, res = _script(run_python, tmp_path, 'cpu_depthwise', '--rounds', '1')
    ms = res['median_ms']
    assert res['max_rel_error'] <= 1e-5 and set(ms) == {'ours', 'onednn', 'copy'} and all(v > 0 for v in ms.values())
    assert res['ours_over_onednn'] == pytest.approx(ms['onednn'] / ms['ours'], rel=1e-2)
    assert res['shape'] == [64, 256, 16, 16] and res['kernel_size'] == 5


def test_stem_benchmark_script(run_python, tmp_path, kernels):
    """``benchmarks/cpu_stem.py`` end to end on one variant: both input layouts checked against float64 and timed,
    the ratio is that of the medians."""
    _, res = _script(run_python, tmp_path, 'cpu_stem', '--rounds', '1')
    assert (res['batch'], res['img_size'], res['patch_size']) == (64, 32, 2)
    for layout in ('nchw', 'channels_last'):
        ms = res[layout]['median_ms']
        assert res[layout]['rel_error']['ours'] <= 1e-5 and set(ms) == {'ours', 'plain'}
        assert all(v > 0 for v in ms.values())
        assert res[layout]['ours_over_plain'] == pytest.approx(ms['plain'] / ms['ours'], rel=1e-2)
