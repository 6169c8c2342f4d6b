"""Weight compatibility with timm's built-in ConvMixer: identical state_dict, strict loads both ways, same logits.

timm's built-in class is imported directly from ``timm.models.convmixer`` (the registry entries are ours), so both
models live in one process; the subprocess test in test_autoload.py covers plain timm with the plugin switched off.
"""
import pytest
import torch
import torch.nn as nn

import timm
from timm.models.convmixer import ConvMixer as BuiltinConvMixer

from timm_convmixer.convmixer import ConvMixer

SHARED = {
    'convmixer_1536_20': dict(dim=1536, depth=20, kernel_size=9, patch_size=7),
    'convmixer_768_32': dict(dim=768, depth=32, kernel_size=7, patch_size=7, act_layer=nn.ReLU),
    'convmixer_1024_20_ks9_p14': dict(dim=1024, depth=20, kernel_size=9, patch_size=14),
}


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so a key or channel mix-up cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(7)


@pytest.mark.parametrize('name', sorted(SHARED))
def test_two_way_strict_load_same_logits(name):
    ours = timm.create_model(name).eval()
    assert isinstance(ours, ConvMixer)
    _randomize_bn(ours, seed=len(name))
    builtin = BuiltinConvMixer(**SHARED[name]).eval()

    ours_sd = ours.state_dict()
    builtin_sd = builtin.state_dict()
    assert list(ours_sd) == list(builtin_sd), 'state_dict keys (and their order) must be timm\'s'
    assert all(ours_sd[k].shape == builtin_sd[k].shape for k in ours_sd)

    # plugin -> plain timm, strictly
    builtin.load_state_dict(ours_sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours_out, builtin_out = ours(x), builtin(x)
    assert (ours_out - builtin_out).abs().max().item() <= 1e-5

    # plain timm -> plugin, strictly, with different weights this time
    _randomize_bn(builtin, seed=len(name) + 1)
    with torch.no_grad():
        builtin.head.weight.mul_(-1.5)
    fresh = timm.create_model(name).eval()
    fresh.load_state_dict(builtin.state_dict(), strict=True)
    with torch.no_grad():
        diff = (fresh(x) - builtin(x)).abs().max().item()
    assert diff <= 1e-5


def test_train_mode_step_matches_builtin():
    """Same loss, same gradients, same BN running-stat updates in training mode (small override of a shared name)."""
    kwargs = dict(dim=32, depth=3, kernel_size=7, patch_size=7, act_layer=nn.ReLU, num_classes=5)
    ours = timm.create_model('convmixer_768_32', **kwargs).train()
    builtin = BuiltinConvMixer(**kwargs).train()
    builtin.load_state_dict(ours.state_dict())
    x, y = torch.randn(4, 3, 56, 42), torch.randint(0, 5, (4,))
    for m in (ours, builtin):
        nn.functional.cross_entropy(m(x), y).backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), builtin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    for (n, b), (_, c) in zip(ours.named_buffers(), builtin.named_buffers()):
        torch.testing.assert_close(b, c, msg=n)


def test_checkpoint_file_moves_both_ways(tmp_path):
    """A file saved by one side loads strictly through timm's own load_checkpoint on the other."""
    from timm.models import load_checkpoint
    kwargs = dict(dim=24, depth=2, kernel_size=9, patch_size=14)
    ours = timm.create_model('convmixer_1024_20_ks9_p14', **kwargs).eval()
    _randomize_bn(ours, 3)
    path = tmp_path / 'ours.pth'
    torch.save({'state_dict': ours.state_dict(), 'epoch': 3}, path)
    builtin = BuiltinConvMixer(**kwargs).eval()
    load_checkpoint(builtin, str(path), strict=True)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(builtin(x), ours(x), rtol=0, atol=1e-5)
    path2 = tmp_path / 'builtin.pth'
    torch.save(builtin.state_dict(), path2)
    back = timm.create_model('convmixer_1024_20_ks9_p14', checkpoint_path=str(path2), **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=1e-5)
