"""The plugin as timm sees it: registry entries, pretrained cfgs, every train.py kwarg, the model interface."""
import functools
import warnings

import pytest
import torch
import torch.nn as nn

import timm
from timm.models import _registry as timm_registry

import timm_convmixer
from timm_convmixer.convmixer import MixerBlock

VARIANTS = {
    # name: (dim, depth, kernel, patch, act, input px, classes)
    'convmixer_1536_20': (1536, 20, 9, 7, nn.GELU, 224, 1000),
    'convmixer_768_32': (768, 32, 7, 7, nn.ReLU, 224, 1000),
    'convmixer_1024_20_ks9_p14': (1024, 20, 9, 14, nn.GELU, 224, 1000),
    'convmixer_1536_24_ks9_p14': (1536, 24, 9, 14, nn.GELU, 224, 1000),
    'convmixer_1024_16_ks9_p7': (1024, 16, 9, 7, nn.GELU, 224, 1000),
    'convmixer_512_16_ks8_p7': (512, 16, 8, 7, nn.GELU, 224, 1000),
    'convmixer_256_8_ks5_p2': (256, 8, 5, 2, nn.GELU, 32, 10),
    'convmixer_256_8_ks9_p1': (256, 8, 9, 1, nn.GELU, 32, 10),
}
SHARED_WITH_TIMM = ('convmixer_1536_20', 'convmixer_768_32', 'convmixer_1024_20_ks9_p14')


@pytest.fixture
def small(small_model):
    """``convmixer_256_8_ks5_p2`` (or the variant given) at dim 16, depth 3, as timm builds it; all overridable."""
    return functools.partial(small_model, dim=16, depth=3)


def test_every_variant_registered_under_module_convmixer():
    assert set(timm.list_models(module='convmixer')) == set(VARIANTS)
    for name in VARIANTS:
        assert timm_registry._model_entrypoints[name].__module__ == 'timm_convmixer.convmixer'
    assert sorted(timm_convmixer.list_variants()) == sorted(VARIANTS)


def test_pretrained_tags_listed_once_and_default_is_timm_hub():
    tagged = timm.list_models('convmixer*', pretrained=True)
    assert len(tagged) == len(set(tagged))
    for name in SHARED_WITH_TIMM:
        assert f'{name}.in1k' in tagged and f'{name}.authors_in1k' in tagged
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.tag == 'in1k' and cfg.hf_hub_id == f'timm/{name}.in1k'
        authors = timm.get_pretrained_cfg(f'{name}.authors_in1k')
        assert authors.url.startswith('https://github.com/tmp-iclr/convmixer/releases/download/v1.0/')
    assert not [t for t in tagged if not t.startswith(SHARED_WITH_TIMM)]


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_variant_architecture_and_cfg(name):
    dim, depth, k, p, act, px, classes = VARIANTS[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    assert (model.num_features, len(model.blocks), model.kernel_size, model.patch_size) == (dim, depth, k, p)
    assert isinstance(model.stem[1], act) and isinstance(model.blocks[0][2], act)
    assert model.blocks[0][0].fn[0].kernel_size == (k, k) and model.stem[0].stride == (p, p)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, px, px) and cfg['num_classes'] == classes == model.num_classes
    for field in ('mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier', 'license', 'paper_ids'):
        assert cfg.get(field), f'{name} cfg lacks {field}'
    assert cfg['first_conv'] == 'stem.0' and cfg['classifier'] == 'head'
    if px == 32:
        assert cfg['crop_pct'] == 1.0 and cfg['mean'] == (0.4914, 0.4822, 0.4471)


def test_train_py_kwargs_accepted(small):
    """Everything timm's train.py passes to create_model (None values are dropped by timm)."""
    model = small(
        pretrained=False, in_chans=1, num_classes=7, drop_rate=0.2, drop_path_rate=0.3,
        global_pool='avgmax', bn_momentum=0.01, bn_eps=1e-3, scriptable=False, exportable=False, no_jit=False)
    assert model.in_chans == 1 and model.num_classes == 7 and model.head_drop.p == 0.2
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 3 and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)
    rates = [blk[0].drop_path.drop_prob if hasattr(blk[0].drop_path, 'drop_prob') else 0. for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.15, 0.3])
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)


def test_drop_block_refused_with_reason(small):
    with pytest.raises(ValueError, match='no DropBlock'):
        small(drop_block_rate=0.1)
    small(drop_block_rate=0.)  # a zero rate asks for nothing


def test_unknown_kwarg_still_a_type_error(small):
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_model_arg'"):
        small(not_a_model_arg=1)


@pytest.mark.parametrize('kwargs, arg', [
    (dict(depth=0), 'depth'), (dict(dim=-4), 'dim'), (dict(kernel_size=0), 'kernel_size'),
    (dict(patch_size=-1), 'patch_size'), (dict(act_layer='not_an_act'), 'act_layer'),
    (dict(drop_path_rate=1.5), 'drop_path_rate'), (dict(bn_eps=0), 'bn_eps'), (dict(depth=2.5), 'depth'),
])
def test_invalid_arch_values_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        timm.create_model('convmixer_256_8_ks5_p2', **kwargs)


def test_arch_kwargs_override_variant(small):
    model = timm.create_model('convmixer_768_32', depth=2, kernel_size=5, dim=32, act_layer='gelu')
    assert len(model.blocks) == 2 and model.blocks[0][0].fn[0].kernel_size == (5, 5)
    assert isinstance(model.blocks[0][2], nn.GELU) and model.num_features == 32
    assert isinstance(small(act_layer=nn.SiLU).stem[1], nn.SiLU)
    assert type(small(act_layer='hard_swish').stem[1]).__name__.lower().startswith('hardswish')


def test_even_kernel_pads_like_pytorch_same(small):
    model = small('convmixer_512_16_ks8_p7', depth=1).eval()
    conv = model.blocks[0][0].fn[0]
    x = torch.randn(1, 16, 9, 11)
    ref = nn.functional.conv2d(nn.functional.pad(x, (3, 4, 3, 4)), conv.weight, conv.bias, groups=16)
    torch.testing.assert_close(conv(x), ref)


@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax', 'catavgmax', 'fast', ''])
def test_every_global_pool(pool, small):
    model = small(global_pool=pool, num_classes=5 if pool else 0).eval()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    if pool:
        assert out.shape == (2, 5)
        assert model.head_hidden_size == 16 * (2 if pool == 'catavgmax' else 1)
    else:
        assert out.shape == (2, 16, 8, 8)  # no pooling, no classifier: the unpooled feature map


def test_heads_features_and_classifier_reset(small):
    model = small(num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 8, 8)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 16)
    assert model.get_classifier() is model.head
    model.reset_classifier(0)
    assert model(x).shape == (2, 16) and model.num_classes == 0
    model.reset_classifier(3, 'catavgmax')
    assert model(x).shape == (2, 3) and model.head.in_features == 32
    model.reset_classifier(4, '')
    assert model.forward_head(feats, pre_logits=True).shape == (2, 16, 8, 8)


def test_forward_intermediates_and_prune(small):
    model = small(depth=4).eval()
    x = torch.randn(1, 3, 16, 16)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 4 and torch.equal(final, model.forward_features(x))
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(last2[0], inter[2])
    early, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(early, inter[1])
    # timm's own feature_take_indices checks the indices: the same error every timm model gives
    with pytest.raises(AssertionError, match='feature index 7 is out of range'):
        model.forward_intermediates(x, indices=[7])
    with pytest.raises(AssertionError, match=r'last-n \(5\) is out of range'):
        model.prune_intermediate_layers(5)
    kept = model.prune_intermediate_layers([1])
    assert kept == [1] and len(model.blocks) == 2 and model.num_classes == 0
    assert model(x).shape == (1, 16, 8, 8)


def test_features_only_getter():
    model = timm.create_model('convmixer_256_8_ks5_p2', dim=16, depth=4, features_only=True).eval()
    outs = model(torch.randn(1, 3, 16, 16))
    assert len(outs) == 3 and all(o.shape == (1, 16, 8, 8) for o in outs)
    assert model.feature_info.channels() == [16, 16, 16] and model.feature_info.reduction() == [2, 2, 2]
    sel = timm.create_model('convmixer_256_8_ks5_p2', dim=16, depth=4, features_only=True, out_indices=(0, 2))
    assert len(sel(torch.randn(1, 3, 16, 16))) == 2
    for depth in (1, 2):  # the default asks for every block of a model shallower than 3
        shallow = timm.create_model('convmixer_256_8_ks5_p2', dim=16, depth=depth, features_only=True).eval()
        assert len(shallow(torch.randn(1, 3, 16, 16))) == depth
    with pytest.raises(ValueError, match=r'expects input of shape \(N, 3, H, W\), got \(1, 4, 16, 16\)'):
        model(torch.randn(1, 4, 16, 16))


def test_group_matcher_layer_decay_groups(small):
    from timm.models._manipulate import group_parameters
    model = small(depth=3)
    groups = group_parameters(model, model.group_matcher(), reverse=False)
    assert len(groups) == 1 + 3 + 1  # stem, one per block, head
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.7)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) == 5 and scales[-1] == pytest.approx(1.0)


def test_grad_checkpointing_same_output_and_recomputes(small, run_counted):
    """Same output; with checkpointing every block runs its forward again during backward, in ``forward`` (timm's
    checkpoint_seq) and in ``forward_intermediates`` (block by block)."""
    model = small().train()  # depth 3
    x = torch.randn(2, 3, 16, 16)

    def block_calls(fn, *args):
        result, paths = run_counted(fn, *args)
        return result, sum(paths.values())

    torch.manual_seed(1)
    out, calls = block_calls(model, x)
    assert calls == 3
    assert block_calls(out.sum().backward)[1] == 0
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out2, calls = block_calls(model, x)
    assert calls == 3
    torch.testing.assert_close(out, out2)
    assert block_calls(out2.sum().backward)[1] == 3
    (final, intermediates), calls = block_calls(model.forward_intermediates, x)
    assert calls == 3 and len(intermediates) == 3
    assert block_calls(lambda: (final.sum() + sum(t.sum() for t in intermediates)).backward())[1] == 3


def test_device_dtype_kwargs(small):
    model = small(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.device('meta'):
        meta = small()
    assert all(p.device.type == 'meta' for p in meta.parameters())


def test_bad_input_named(small):
    model = small().eval()
    with pytest.raises(ValueError, match=r'\(N, 3, H, W\)'):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r'got \(1, 4, 16, 16\)'):
        model(torch.randn(1, 4, 16, 16))


def test_torchscript(small):
    model = small().eval()
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


def test_block_children_keep_timm_layout(small):
    blk = small().blocks[0]
    assert isinstance(blk, MixerBlock) and isinstance(blk, nn.Sequential) and len(blk) == 4
    keys = set(small(depth=1).state_dict())
    assert {'stem.0.weight', 'stem.2.running_mean', 'blocks.0.0.fn.0.weight', 'blocks.0.0.fn.2.weight',
            'blocks.0.1.weight', 'blocks.0.3.num_batches_tracked', 'head.weight'} <= keys


def test_registering_twice_is_harmless(run_python):
    """Re-executing the registration module (a second plugin load, a reload) changes nothing and warns nothing.

    In a subprocess: a reload makes new classes, which would break ``isinstance`` checks in later tests here.
    """
    code = '''
        import importlib, warnings
        import timm, timm_convmixer, timm_convmixer.convmixer, _timm_convmixer_autoload
        before = timm.list_models('convmixer*', pretrained=True)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # no "Overwriting ..." warning for our own names
            importlib.reload(timm_convmixer.convmixer)
            _timm_convmixer_autoload.load_plugins()
        assert timm.list_models('convmixer*', pretrained=True) == before
        assert sorted(timm.list_models(module='convmixer')) == sorted(timm_convmixer.list_variants())
        m = timm.create_model('convmixer_256_8_ks5_p2', dim=8, depth=1)
        assert type(m) is timm_convmixer.convmixer.ConvMixer, type(m)
        print('ok', len(before))
    '''
    proc = run_python(code=code)
    assert proc.stdout.startswith('ok')


@pytest.mark.parametrize('command', [
    ['convert', 'src.pth', 'out', '--model', 'convmixer_256_8_ks5_p2'],
    ['export', '--model', 'convmixer_256_8_ks5_p2', '--out', 'x.onnx'],
    ['bench', '--models', 'convmixer_256_8_ks5_p2'],
    ['demo'],
])
def test_model_kwargs_parse_alike_and_refuse_a_bare_name(command, capsys):
    from timm_convmixer.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(command + ['--model-kwargs', 'depth=2', "act_layer=relu", 'kernel_size=(5)'])
    assert args.model_kwargs == {'depth': 2, 'act_layer': 'relu', 'kernel_size': 5}
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(command + ['--model-kwargs', 'depth'])
    assert exc.value.code == 2
    assert "--model-kwargs: expected key=value, got 'depth'" in capsys.readouterr().err
