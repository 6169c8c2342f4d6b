"""Weight compatibility with timm's built-in ConvMixer: identical state_dict, strict loads both ways, same logits.

timm's built-in class is imported directly from ``timm.models.convmixer`` (the registry entries are ours), so both
models live in one process; the subprocess test in test_autoload.py covers plain timm with the plugin switched off.
"""
import pytest
import torch
import torch.nn as nn

import timm
from timm.models.convmixer import ConvMixer as BuiltinConvMixer

from helpers import Normal, Uniform
from timm_convmixer.convmixer import ConvMixer

SHARED = {
    'convmixer_1536_20': dict(dim=1536, depth=20, kernel_size=9, patch_size=7),
    'convmixer_768_32': dict(dim=768, depth=32, kernel_size=7, patch_size=7, act_layer=nn.ReLU),
    'convmixer_1024_20_ks9_p14': dict(dim=1024, depth=20, kernel_size=9, patch_size=14),
}


# non-trivial BN statistics, affine parameters and counts, so a key or channel mix-up cannot go unnoticed
BN = dict(mean=Normal(0.2), var=Uniform(0.5, 1.5), weight=Uniform(0.5, 1.5), bias=Normal(0.1), num_batches_tracked=7)


@pytest.mark.parametrize('name', sorted(SHARED))
def test_two_way_strict_load_same_logits(name, randomize_bn):
    ours = timm.create_model(name).eval()
    assert isinstance(ours, ConvMixer)
    randomize_bn(ours, seed=len(name), **BN)
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
    randomize_bn(builtin, seed=len(name) + 1, **BN)
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


def test_checkpoint_file_moves_both_ways(tmp_path, randomize_bn):
    """A file saved by one side loads strictly through timm's own load_checkpoint on the other."""
    from timm.models import load_checkpoint
    kwargs = dict(dim=24, depth=2, kernel_size=9, patch_size=14)
    ours = timm.create_model('convmixer_1024_20_ks9_p14', **kwargs).eval()
    randomize_bn(ours, 3, **BN)
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
