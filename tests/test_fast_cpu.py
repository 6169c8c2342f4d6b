"""The CPU fast path computes the eager function, applies only where it may, and the backend switch works."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import timm
from timm_convmixer import fast
from timm_convmixer.fast import cpu as fast_cpu

pytestmark = pytest.mark.skipif(not fast_cpu.available(), reason='oneDNN fused convolution not available')


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics/affine so folding mistakes show (fresh BNs are the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))  # includes negative scales
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model


def _model(kernel_size: int = 5, act: str = 'gelu', dim: int = 24, depth: int = 2, patch: int = 4) -> nn.Module:
    model = timm.create_model(
        'convmixer_256_8_ks5_p2', dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch, act_layer=act,
        num_classes=7)
    return _randomize_bn(model).eval()


def _run(model: nn.Module, x: torch.Tensor, backend: str):
    fast.reset_counters()
    with fast.use_backend(backend), torch.no_grad():
        out = model(x)
    return out, dict(fast.counters)


@pytest.mark.parametrize('kernel_size', [5, 8, 9])
@pytest.mark.parametrize('act', ['relu', 'gelu', 'silu'])
def test_model_matches_eager(kernel_size, act):
    model = _model(kernel_size, act)
    x = torch.randn(2, 3, 36, 52)  # non-square; 9x13 tokens
    fast_out, fast_paths = _run(model, x, 'cpu')
    eager_out, eager_paths = _run(model, x, 'eager')
    assert fast_paths == {'cpu': 2}
    assert eager_paths == {'eager': 2}
    torch.testing.assert_close(fast_out, eager_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel_size', [5, 8, 9])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape', [(1, 7, 5), (3, 6, 11)])
def test_block_matches_eager(kernel_size, channels_last, shape):
    """Block level, odd/even spatial sizes and batch 1, both input layouts; the output keeps the values."""
    block = _model(kernel_size).blocks[0]
    n, h, w = shape
    x = torch.randn(n, 24, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with fast.use_backend('eager'):
            ref = block(x)
        with fast.use_backend('cpu'):
            out = block(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_inference_mode_and_auto():
    model = _model(9)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), fast.use_backend('eager'):
        ref = model(x)
    fast.reset_counters()
    with torch.inference_mode():  # 'auto' picks the CPU path for CPU tensors
        out = model(x)
    assert fast.counters['cpu'] == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_grad_needed_runs_eager():
    """Outside no_grad the parameters need gradients; the fused ops have none, so eager runs."""
    model = _model()
    fast.reset_counters()
    out = model(torch.randn(1, 3, 16, 16))
    out.sum().backward()
    assert fast.counters == {'eager': 2}
    assert model.blocks[0][1].weight.grad is not None


def test_train_mode_runs_eager_and_updates_stats():
    model = _model()
    model.train()
    before = model.blocks[1][3].running_mean.clone()
    fast.reset_counters()
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert fast.counters == {'eager': 2}
    assert not torch.equal(before, model.blocks[1][3].running_mean)


def test_not_after_convert_sync_batchnorm():
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    ref, _ = _run(model, x, 'eager')
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert type(synced.blocks[0][3]) is nn.SyncBatchNorm
    out, paths = _run(synced, x, 'auto')
    assert paths == {'eager': 2}
    torch.testing.assert_close(out, ref)


def test_hooks_disable_fast_path():
    model = _model()
    seen = []
    handle = model.blocks[0][1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _, paths = _run(model, torch.randn(1, 3, 16, 16), 'auto')
    handle.remove()
    assert seen and paths == {'eager': 1, 'cpu': 1}  # only the hooked block ran its modules


def test_fp16_autocast_and_tracing_run_eager():
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    fast.reset_counters()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        model(x)
    assert fast.counters == {'eager': 2}
    fast.reset_counters()
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)  # the check re-runs eagerly
    assert fast.counters == {"eager": 2}
    ref, _ = _run(model, x, 'eager')
    torch.testing.assert_close(traced(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fast_cpu.native_bf16(), reason='oneDNN has no bf16 kernels on this CPU')
@pytest.mark.parametrize('kernel_size', [8, 9])
def test_bf16_autocast_matches_eager_autocast(kernel_size):
    """Under bf16 autocast the fast path computes in bf16 as eager does, and is at least as close to fp32."""
    model = _model(kernel_size=kernel_size, dim=32, depth=3)
    x = torch.randn(2, 3, 20, 16)
    ref32, _ = _run(model, x, 'eager')
    outs = {}
    for backend in ('cpu', 'eager'):
        fast.reset_counters()
        with fast.use_backend(backend), torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            outs[backend] = model(x)
        assert dict(fast.counters) == {backend: 3}
        assert outs[backend].dtype == torch.bfloat16  # autocast's output dtype, as eager gives it
    err_fast = (outs['cpu'].float() - ref32).abs().max().item()
    err_eager = (outs['eager'].float() - ref32).abs().max().item()
    scale = ref32.abs().max().item()
    assert err_fast < 0.05 * scale, (err_fast, scale)
    assert err_fast <= 1.5 * err_eager + 1e-3 * scale, (err_fast, err_eager)
    torch.testing.assert_close(outs['cpu'].float(), outs['eager'].float(), rtol=0.05, atol=0.05 * scale)


def test_cache_follows_weight_changes_and_state_dict_unchanged():
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, x, 'cpu')
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, keys[k]), k
    # in-place edits (an optimizer step, load_state_dict) must invalidate the folded weights
    with torch.no_grad():
        model.blocks[0][0].fn[2].running_var.mul_(3)
        model.blocks[1][1].weight.add_(0.1)
    out, paths = _run(model, x, 'cpu')
    ref, _ = _run(model, x, 'eager')
    assert paths == {'cpu': 2}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    other = _model()
    model.load_state_dict(_randomize_bn(other).state_dict())
    out, _ = _run(model, x, 'cpu')
    ref, _ = _run(model, x, 'eager')
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_changing_batch_and_size_repacks_and_stays_exact():
    """Weights are packed for the input's exact shape; a new batch size or image size must repack, not misuse."""
    model = _model(kernel_size=9)
    for shape in ((2, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16), (1, 3, 20, 12)):
        x = torch.randn(*shape)
        out, paths = _run(model, x, 'cpu')
        ref, _ = _run(model, x, 'eager')
        assert paths == {'cpu': 2}, shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert tuple(fast_cpu._cache[model.blocks[0][0].fn[0]].key[-2]) == (1, 24, 5, 3)  # the last shape seen


def test_backend_switch():
    assert fast.get_backend() in fast.BACKENDS
    with pytest.raises(ValueError):
        fast.set_backend('cuda-magic')
    previous = fast.get_backend()
    with fast.use_backend('eager'):
        assert fast.get_backend() == 'eager'
    assert fast.get_backend() == previous
    # 'triton' never applies to CPU tensors
    _, paths = _run(_model(), torch.randn(1, 3, 16, 16), 'triton')
    assert paths == {'eager': 2}


def test_env_var_selects_backend():
    env = dict(os.environ, TIMM_CONVMIXER_BACKEND='eager')
    code = 'import timm_convmixer.fast as f; print(f.get_backend())'
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == 'eager'
