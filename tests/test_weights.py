""" Weights: Hub download, the authors' checkpoints, conversion and publishing, and their failures

Everything runs the real huggingface_hub, timm and torch code against ``hub_server.HubLookAlike`` on 127.0.0.1.
Whatever goes through huggingface_hub runs in a fresh interpreter with ``HF_ENDPOINT``/``HF_HOME``/``HF_HUB_OFFLINE``
in its environment, as a user would configure it (huggingface_hub reads those once, at import); torch.hub's url
routes run in-process with ``TORCH_HOME`` set (read at each call).
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import timm
from timm.models import adapt_input_conv, load_checkpoint

import helpers as shared
from helpers import Uniform
from hub_server import HubLookAlike
from timm_convmixer import NonFiniteWeightsError, NonFiniteWeightsWarning, check_finite, cli, fast, find_nonfinite
from timm_convmixer.cli.convert import convert_checkpoint
from timm_convmixer.convmixer import CIFAR10_CLASSES
from timm_convmixer.weights import CheckpointError, read_checkpoint

SMALL = shared.SMALL_VARIANT
WEIGHTED = {  # variant -> (authors' release file name, an input size that is a small multiple of the patch)
    'convmixer_1536_20': ('convmixer_1536_20_ks9_p7.pth.tar', 14),
    'convmixer_768_32': ('convmixer_768_32_ks7_p7_relu.pth.tar', 14),
    'convmixer_1024_20_ks9_p14': ('convmixer_1024_20_ks9_p14.pth.tar', 28),
}
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- helpers -----------------------------------------------------------------------------------------------------

def to_authors(sd):
    """timm layout -> the authors' bare nn.Sequential keys (0, 2 stem; 3+i blocks; depth+5 head)."""
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    out = {}
    for k, v in sd.items():
        if k.startswith('stem.'):
            out[k[len('stem.'):]] = v
        elif k.startswith('blocks.'):
            _, i, rest = k.split('.', 2)
            out[f'{3 + int(i)}.{rest}'] = v
        else:
            out[f'{depth + 5}.{k[len("head."):]}'] = v
    return out


def train_py_checkpoint(sd, ema=None, prefix='module.'):
    """What timm's train.py (the authors' fork included) saves: wrappers, args Namespace, optimizer state."""
    ckpt = {
        'epoch': 149, 'arch': 'convmixer', 'version': 2, 'metric': 81.4,
        'state_dict': {prefix + k: v for k, v in sd.items()},
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.01, 'params': [0, 1]}]},
        'args': argparse.Namespace(model='convmixer', lr=0.01, opt='adamw'),
    }
    if ema is not None:
        ckpt['state_dict_ema'] = dict(ema)
    return ckpt


# BN running stats drawn from the seeded global generator, affine left as built: a skipped buffer shows in the logits
RUNNING_STATS = dict(seed=None, mean=Uniform(-0.5, 0.5), var=Uniform(0.5, 1.5), weight=None, bias=None)


def small_model(seed=0, **kwargs):
    return shared.small_model(SMALL, seed=seed, randomize=RUNNING_STATS, **kwargs)


def _randomize_bn(model):
    shared.randomize_bn(model, **RUNNING_STATS)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def logits(model, size=32, chans=3):
    """Logits compared bit for bit across processes, so through the plain modules: ``auto`` picks a path by timing,
    and two processes may pick differently (equal to ~1e-7, not bitwise)."""
    torch.manual_seed(123)
    with torch.no_grad(), fast.use_backend('eager'):
        return model.eval()(torch.randn(2, chans, size, size))


def safetensors_bytes(sd, tmp_path, name='w.safetensors'):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path.read_bytes()


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def hub():
    server = HubLookAlike().start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """A fresh torch.hub cache for the url routes (torch reads ``TORCH_HOME`` at each call). huggingface_hub reads
    its settings once, at import, so the Hub tests run it in fresh interpreters configured by ``subprocess_env``."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))


def subprocess_env(hub, tmp_path, **extra):
    return dict(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_DISABLE_XET='1',
                HF_HUB_DISABLE_TELEMETRY='1', HF_TOKEN='dummy-token', TORCH_HOME=str(tmp_path / 'torch_home'),
                TIMM_CONVMIXER_BACKEND='eager', **extra)  # bitwise logits: see logits() (threads: conftest)


def assert_loads_from_hub(model_id, expected_logits, tmp_path, env, run_python):
    """``timm.create_model(model_id, pretrained=True)`` in a fresh interpreter configured by ``env`` gives our class
    and exactly ``expected_logits`` (the ``logits`` helper's input)."""
    torch.save(expected_logits, tmp_path / 'expected_logits.pt')
    code = f'''
        import torch, timm
        model = timm.create_model({model_id!r}, pretrained=True).eval()
        assert type(model).__module__ == 'timm_convmixer.convmixer', type(model)
        torch.manual_seed(123)
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        assert torch.equal(out, torch.load({str(tmp_path / 'expected_logits.pt')!r}, weights_only=True))
        print('OK')
    '''
    assert run_python(code=code, env=env, cwd=REPO_ROOT, timeout=240).stdout.strip().endswith('OK')


# --- timm's Hub repos: download, cache, offline, adaptation -------------------------------------------------------

_LOAD_AND_COMPARE = '''
    import torch, timm
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
    from timm.models import adapt_input_conv

    def logits(model, size, chans=3):
        torch.manual_seed(123)
        with torch.no_grad():
            return model.eval()(torch.randn(2, chans, size, size))

    def load_and_compare(name, **kwargs):
        ref = torch.load(f'{DATA}/{name}.pt', weights_only=True)
        model = timm.create_model(name, pretrained=True, depth=2, **kwargs)
        assert type(model).__module__ == 'timm_convmixer.convmixer', type(model)
        if not kwargs:
            state = model.state_dict()
            assert set(state) == set(ref['state_dict']), name
            assert all(torch.equal(state[k], v) for k, v in ref['state_dict'].items()), name
            assert torch.equal(logits(model, ref['size']), ref['logits']), name
        return model, ref
'''


def test_pretrained_from_hub_cache_offline_and_adaptation(hub, tmp_path, run_python):
    """A user's view, configured by huggingface_hub's environment variables: each name's ``timm/<name>.in1k`` repo
    downloads once, is cached, loads with ``HF_HUB_OFFLINE=1`` without a single request and adapts (new head, 1- or
    4-channel stem) as timm does; offline with nothing cached and a missing repo fail with huggingface_hub's errors."""
    for name, (_, size) in WEIGHTED.items():
        torch.manual_seed(1)
        ref = timm.create_model(name, depth=2).eval()  # a depth override keeps the files small; the path is the same
        _randomize_bn(ref)
        repo = f'timm/{name}.in1k'
        hub.add_file(repo, 'model.safetensors', safetensors_bytes(ref.state_dict(), tmp_path))
        assert timm.models.get_pretrained_cfg(f'{name}.in1k').hf_hub_id == repo
        torch.save(dict(state_dict=ref.state_dict(), logits=logits(ref, size), size=size), tmp_path / f'{name}.pt')
    env = subprocess_env(hub, tmp_path)
    online = f'DATA = {str(tmp_path)!r}\nNAMES = {list(WEIGHTED)!r}\n' + textwrap.dedent(_LOAD_AND_COMPARE) + '''
for name in NAMES:
    load_and_compare(name)
    load_and_compare(name)  # cached: no second download (counted by the test)
try:
    timm.create_model('hf-hub:nobody/no-such-convmixer', pretrained=True)
    raise AssertionError('a missing repo loaded')
except RepositoryNotFoundError as e:
    assert 'nobody/no-such-convmixer' in str(e), e
print('OK')
'''
    assert run_python(code=online, env=env, cwd=REPO_ROOT, timeout=240).stdout.strip().endswith('OK')
    for name in WEIGHTED:
        repo = f'timm/{name}.in1k'
        assert hub.count('GET', f'/{repo}/resolve/main/model.safetensors') == 1
        assert list((tmp_path / 'hf_home' / 'hub').glob(f'models--timm--{name}.in1k/snapshots/*/model.safetensors'))
    assert hub.count(contains='pytorch_model.bin') == 0  # safetensors first: the pickle is never asked for

    offline = f'DATA = {str(tmp_path)!r}\nNAMES = {list(WEIGHTED)!r}\n' + textwrap.dedent(_LOAD_AND_COMPARE) + '''
for name in NAMES:
    _, ref = load_and_compare(name)
    head5, _ = load_and_compare(name, num_classes=5)
    state = ref['state_dict']
    assert head5.head.weight.shape == (5, state['head.weight'].shape[1])
    assert torch.equal(head5.blocks[1][1].weight, state['blocks.1.1.weight'])
    for chans in (1, 4):
        adapted, _ = load_and_compare(name, in_chans=chans)
        assert torch.equal(adapted.stem[0].weight, adapt_input_conv(chans, state['stem.0.weight']))
        assert torch.equal(adapted.head.weight, state['head.weight'])
        assert logits(adapted, ref['size'], chans).shape == (2, 1000)
try:  # nothing cached for this name: huggingface_hub's offline refusal, not a network error
    timm.create_model('convmixer_512_16_ks8_p7', pretrained=True, depth=2,
                      pretrained_cfg_overlay=dict(hf_hub_id='timm/convmixer_512_16_ks8_p7.never_fetched'))
    raise AssertionError('loaded offline with nothing cached')
except LocalEntryNotFoundError as e:
    assert isinstance(e.__cause__, OfflineModeIsEnabled), repr(e.__cause__)
    assert 'HF_HUB_OFFLINE' in str(e.__cause__), e.__cause__
print('OK')
'''
    before = len(hub.requests)
    proc = run_python(code=offline, env=dict(env, HF_HUB_OFFLINE='1'), cwd=REPO_ROOT, timeout=240)
    assert proc.stdout.strip().endswith('OK')
    assert len(hub.requests) == before


# --- the authors' layout and train.py checkpoints ----------------------------------------------------------------

def test_authors_layout_loads_as_pretrained_file_and_checkpoint_path(tmp_path):
    ref = small_model(seed=2)
    ema = small_model(seed=3)
    authors = to_authors(ref.state_dict())
    plain = tmp_path / 'authors.pth'
    torch.save(authors, plain)
    wrapped = tmp_path / 'authors_train.pth.tar'
    torch.save(train_py_checkpoint(authors), wrapped)
    with_ema = tmp_path / 'authors_ema.pth.tar'
    torch.save(train_py_checkpoint(authors, ema=to_authors(ema.state_dict())), with_ema)
    model_key = tmp_path / 'model_key.pth'
    torch.save({'model': {'_orig_mod.' + k: v for k, v in ref.state_dict().items()}}, model_key)
    expected = logits(ref)

    for path in (plain, wrapped, model_key):
        via_filter = timm.create_model(SMALL, depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        assert torch.equal(logits(via_filter), expected), path.name
        via_ckpt = timm.create_model(SMALL, depth=2, checkpoint_path=str(path))  # train.py --initial-checkpoint
        assert torch.equal(logits(via_ckpt), expected), path.name
    # timm's loaders prefer EMA weights when a checkpoint has them; so do we
    assert torch.equal(logits(timm.create_model(SMALL, depth=2, checkpoint_path=str(with_ema))), logits(ema))
    # objects handed straight to load_state_dict: wrappers and prefixes too
    model = small_model(seed=9)
    model.load_state_dict(train_py_checkpoint(authors))
    assert torch.equal(logits(model), expected)
    # fine-tuning from the authors' weights with a new head
    tuned = timm.create_model(SMALL, depth=2, num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(wrapped)))
    assert tuned.head.weight.shape == (3, 256)
    assert torch.equal(tuned.stem[0].weight, ref.stem[0].weight)


@pytest.mark.parametrize('name', list(WEIGHTED))
def test_authors_tag_downloads_release_file_safely(name, hub, hub_env, tmp_path):
    filename, size = WEIGHTED[name]
    cfg = timm.models.get_pretrained_cfg(f'{name}.authors_in1k')
    assert cfg.url == 'https://github.com/tmp-iclr/convmixer/releases/download/v1.0/' + filename
    assert cfg.custom_load is True
    torch.manual_seed(4)
    ref = timm.create_model(name, depth=2).eval()
    _randomize_bn(ref)
    buf = tmp_path / filename
    torch.save(train_py_checkpoint(to_authors(ref.state_dict())), buf)  # args Namespace inside, as train.py saves
    hub.files[filename] = buf.read_bytes()
    # timm resets custom_load when an overlay replaces the source, so the overlay keeps it explicitly
    overlay = dict(url=hub.url(filename), custom_load=True)
    model = timm.create_model(f'{name}.authors_in1k', pretrained=True, depth=2, pretrained_cfg_overlay=overlay)
    assert torch.equal(logits(model, size), logits(ref, size))
    assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / filename).is_file()  # torch.hub's cache
    # adaptation still timm's: new head, 1-channel stem
    adapted = timm.create_model(f'{name}.authors_in1k', pretrained=True, depth=2, num_classes=4, in_chans=1,
                                pretrained_cfg_overlay=overlay)
    assert adapted.head.weight.shape == (4, ref.num_features)
    assert torch.equal(adapted.stem[0].weight, adapt_input_conv(1, ref.stem[0].weight))


def test_plain_url_path_loads_authors_state_dict(hub, hub_env, tmp_path):
    ref = small_model(seed=5)
    bare = tmp_path / 'bare.pth'
    torch.save(to_authors(ref.state_dict()), bare)
    hub.files['bare.pth'] = bare.read_bytes()
    model = timm.create_model(SMALL, depth=2, pretrained=True, pretrained_cfg_overlay=dict(url=hub.url('bare.pth')))
    assert torch.equal(logits(model), logits(ref))


class _Evil:
    """Unpickling this runs os.mkdir: what weights_only=True exists to stop."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_pickle_is_never_unpickled(hub, hub_env, tmp_path):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {'0.weight': torch.zeros(1)}, 'payload': _Evil(str(marker))}, evil)
    # one name per url route: torch.hub caches by file name, so a shared name would be fetched only once
    for name in ('evil_custom.pth.tar', 'evil_url.pth.tar'):
        hub.files[name] = evil.read_bytes()
    # each route must reach the unpickler and be refused there, naming the blocked global (torch's, timm's or our
    # wording); a 404 or a "does not fit" error would not match
    refused = r'(?is)weights.only.*mkdir'
    with pytest.raises(CheckpointError, match='unsafe-pickle'):
        read_checkpoint(evil)
    with pytest.raises(Exception, match=refused):
        timm.create_model(SMALL, depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    with pytest.raises(CheckpointError, match=refused + '(.|\n)*unsafe-pickle'):  # custom_load path (authors' tags)
        timm.create_model('convmixer_768_32.authors_in1k', pretrained=True, depth=2,
                          pretrained_cfg_overlay=dict(url=hub.url('evil_custom.pth.tar'), custom_load=True))
    assert hub.count('GET', '/files/evil_custom.pth.tar') == 1
    with pytest.raises(Exception, match=refused):  # timm's plain url path
        timm.create_model(SMALL, depth=2, pretrained=True,
                          pretrained_cfg_overlay=dict(url=hub.url('evil_url.pth.tar')))
    assert hub.count('GET', '/files/evil_url.pth.tar') == 1
    with pytest.raises(Exception, match=refused):
        timm.create_model(SMALL, depth=2, checkpoint_path=str(evil))
    assert cli.main(['convert', str(evil), str(tmp_path / 'out'), '--model', SMALL]) == 1
    assert not marker.exists()
    assert not (tmp_path / 'out').exists()


# --- bad input: clear errors, nothing half-loaded ----------------------------------------------------------------

def test_wrong_architecture_or_size_leaves_model_untouched(tmp_path):
    model = small_model(seed=6)
    before = snapshot(model)
    other_size = timm.create_model(SMALL, depth=2, dim=128).state_dict()
    other_depth = to_authors(timm.create_model(SMALL, depth=3).state_dict())
    other_arch = timm.create_model('resnet10t', num_classes=10).state_dict()
    for sd, pattern in ((other_size, r'dim=256.*\n.*dim=128'), (other_depth, 'depth=2(.|\n)*depth=3'),
                        (other_arch, 'none of them ConvMixer-shaped')):
        path = tmp_path / 'other.pth'
        torch.save(train_py_checkpoint(sd), path)
        with pytest.raises(RuntimeError, match=pattern) as err:
            load_checkpoint(model, str(path))
        assert 'nothing was loaded' in str(err.value)
        with pytest.raises(RuntimeError, match='does not fit'):
            model.load_state_dict(sd)
        assert_same_tensors(snapshot(model), before)
        with pytest.raises(RuntimeError, match='does not fit'):
            timm.create_model(SMALL, depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # tensors without data (a model built on the meta device): torch copied the others, then raised
    with torch.device('meta'):
        dataless = timm.create_model(SMALL, depth=2).state_dict()
    with pytest.raises(RuntimeError, match=r'without data \(meta device\)(.|\n)*nothing was loaded'):
        model.load_state_dict(dataless)
    assert_same_tensors(snapshot(model), before)
    with torch.device('meta'):  # into a model without data itself, as torch allows, or a key not loaded at all
        timm.create_model(SMALL, depth=2).load_state_dict(dataless)
    model.load_state_dict({**model.state_dict(), 'extra': torch.empty(1, device='meta')}, strict=False)


def test_a_new_head_loads_only_a_checkpoint_of_the_same_body(tmp_path):
    """With a new head timm loads pretrained weights ``strict=False`` (the classifier dropped), which took a
    checkpoint of another depth without a word, its missing block left random; the filter checks the keys but the
    classifier's. The same body loads, the stem adapted to ``in_chans`` by timm after the filter."""
    path = tmp_path / 'depth2.safetensors'
    ref = small_model(seed=7)
    save_file(ref.state_dict(), str(path))
    overlay = dict(pretrained_cfg_overlay=dict(file=str(path)))
    for depth in (1, 3):
        with pytest.raises(RuntimeError, match='depth=2(.|\n)*nothing was loaded') as err:
            timm.create_model(SMALL, depth=depth, num_classes=5, pretrained=True, **overlay)
        assert f'depth={depth}' in str(err.value)
    tuned = timm.create_model(SMALL, depth=2, num_classes=5, in_chans=1, pretrained=True, **overlay)
    body = {k: v for k, v in snapshot(ref).items() if not k.startswith(('head.', 'stem.0.weight'))}
    assert_same_tensors({k: v for k, v in snapshot(tuned).items() if k in body}, body)
    partial = timm.create_model(SMALL, depth=3, pretrained=True, pretrained_strict=False, **overlay)  # asked for
    assert_same_tensors({k: v for k, v in snapshot(partial).items() if k in body}, body)


def test_a_checkpoint_without_num_batches_tracked_loads_as_into_plain_timm(tmp_path):
    """torch's BatchNorm fills in a ``num_batches_tracked`` a checkpoint predates (no version metadata: a
    safetensors file, a converter's dict), so plain timm loads such files strictly; so do we. With version 2
    metadata it is missing, as torch says too."""
    ref = small_model(seed=8)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith('num_batches_tracked')}
    model = small_model(seed=9)
    model.load_state_dict(sd)
    assert_same_tensors({k: v for k, v in snapshot(model).items() if k in sd}, sd)
    path = tmp_path / 'no_nbt.safetensors'
    save_file(sd, str(path))
    loaded = small_model(seed=10)
    load_checkpoint(loaded, str(path))  # (timm's checkpoint_path= / --initial-checkpoint)
    assert_same_tensors({k: v for k, v in snapshot(loaded).items() if k in sd}, sd)
    versioned = ref.state_dict()
    for k in [k for k in versioned if k.endswith('num_batches_tracked')]:
        del versioned[k]
    with pytest.raises(RuntimeError, match='missing from checkpoint.*num_batches_tracked'):
        small_model(seed=9).load_state_dict(versioned)


def test_truncated_or_corrupt_files_fail_clearly(tmp_path):
    ref = small_model(seed=7)
    good_pth = tmp_path / 'good.pth'
    torch.save(ref.state_dict(), good_pth)
    good_st = tmp_path / 'good.safetensors'
    save_file(ref.state_dict(), str(good_st))
    model = small_model(seed=8)
    before = snapshot(model)
    for good in (good_pth, good_st):
        data = good.read_bytes()
        for label, payload in (('truncated', data[:len(data) // 2]), ('corrupt', b'\x00garbage' * 64)):
            bad = tmp_path / f'{label}{good.suffix}'
            bad.write_bytes(payload)
            with pytest.raises(CheckpointError, match='truncated or corrupt'):
                read_checkpoint(bad)
            # timm's own loaders raise torch's / safetensors' messages; for random bytes torch's unpickler reads
            # a legacy pickle and timm reports a weights_only refusal (timm's wording, not ours)
            timm_msg = '(?i)corrupt|deserializ|weights_only'
            with pytest.raises(Exception, match=timm_msg):
                load_checkpoint(model, str(bad))
            with pytest.raises(Exception, match=timm_msg):
                timm.create_model(SMALL, depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))
            assert_same_tensors(snapshot(model), before)
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        read_checkpoint(tmp_path / 'empty.pth')
    with pytest.raises(FileNotFoundError, match='not found'):
        read_checkpoint(tmp_path / 'missing.pth')


def test_unknown_architecture_in_config_and_unknown_tag(tmp_path):
    folder = tmp_path / 'weird'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({'architecture': 'convmixer_4096_99', 'num_classes': 10,
                                                    'pretrained_cfg': {}}))
    with pytest.raises(RuntimeError, match='Unknown model.*convmixer_4096_99'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    with pytest.raises(RuntimeError, match=r'Invalid pretrained tag \(nope\)'):
        timm.create_model('convmixer_768_32.nope', pretrained=True)
    # convert checks the name before touching the (here missing) file
    with pytest.raises(RuntimeError, match=r'Invalid pretrained tag \(nope\)'):
        convert_checkpoint(tmp_path / 'missing.pth', tmp_path / 'o', 'convmixer_768_32.nope')
    with pytest.raises(ValueError, match='unknown model'):
        convert_checkpoint(tmp_path / 'missing.pth', tmp_path / 'o', 'convmixer_4096_99')
    with pytest.raises(ValueError, match='resnet10t builds a ResNet; convert handles ConvMixer variants only'):
        convert_checkpoint(tmp_path / 'missing.pth', tmp_path / 'o', 'resnet10t')


# --- conversion, round trips, publishing -------------------------------------------------------------------------

def test_convert_authors_checkpoint_round_trips_through_local_dir_and_hf_hub(hub, tmp_path, run_python):
    ref = small_model(seed=10)
    src = tmp_path / 'convmixer_authors.pth.tar'
    torch.save(train_py_checkpoint(to_authors(ref.state_dict())), src)
    out = tmp_path / 'converted'
    assert cli.main(['convert', str(src), str(out), '--model', SMALL, '--model-kwargs', 'depth=2']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.converted')]  # no temp dirs left
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == SMALL and config['model_args']['depth'] == 2
    # num_classes only at the top level (transformers passes its own beside model_args); class names beside it
    assert config['num_classes'] == 10 and 'num_classes' not in config['model_args']
    assert config['label_names'] == list(CIFAR10_CLASSES)
    card = (out / 'README.md').read_text()
    assert card.startswith('---\n') and 'library_name: timm' in card and 'license: mit' in card
    assert "authors' nn.Sequential layout" in card

    local = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert_same_tensors(snapshot(local), snapshot(ref))

    for name in ('config.json', 'model.safetensors', 'README.md'):
        hub.add_file('someone/convmixer-cifar', name, (out / name).read_bytes())
    assert_loads_from_hub('hf-hub:someone/convmixer-cifar', logits(ref), tmp_path, subprocess_env(hub, tmp_path),
                          run_python)


def test_convert_formats_ema_force_and_failures(tmp_path):
    ref, ema = small_model(seed=11), small_model(seed=12)
    st = tmp_path / 'w.safetensors'
    save_file(ref.state_dict(), str(st))
    ckpt = tmp_path / 'train.pth.tar'
    torch.save(train_py_checkpoint(ref.state_dict(), ema=ema.state_dict()), ckpt)
    out = tmp_path / 'out'

    convert_checkpoint(st, out, SMALL, model_kwargs=dict(depth=2))
    assert_same_tensors(snapshot(timm.create_model(f'local-dir:{out}', pretrained=True)), snapshot(ref))
    with pytest.raises(FileExistsError, match='--force'):
        convert_checkpoint(ckpt, out, SMALL, model_kwargs=dict(depth=2), use_ema=True)
    convert_checkpoint(ckpt, out, SMALL, model_kwargs=dict(depth=2), use_ema=True, force=True)
    assert_same_tensors(snapshot(timm.create_model(f'local-dir:{out}', pretrained=True)), snapshot(ema))

    # a fine-tuned head (num_classes from the weights) and an old whole-model pickle, only with --unsafe-pickle
    tuned = small_model(seed=13, num_classes=3, in_chans=1)
    pickled = tmp_path / 'whole_model.pth'
    torch.save(tuned, pickled)
    with pytest.raises(CheckpointError, match='unsafe-pickle'):
        convert_checkpoint(pickled, tmp_path / 'tuned', SMALL, model_kwargs=dict(depth=2))
    convert_checkpoint(pickled, tmp_path / 'tuned', SMALL, model_kwargs=dict(depth=2), unsafe_pickle=True)
    reloaded = timm.create_model(f'local-dir:{tmp_path / "tuned"}', pretrained=True)
    assert reloaded.num_classes == 3 and reloaded.in_chans == 1
    tuned_config = json.loads((tmp_path / 'tuned' / 'config.json').read_text())
    assert 'label_names' not in tuned_config and 'label_names' not in tuned_config['pretrained_cfg']  # not CIFAR's
    assert not reloaded.pretrained_cfg.get('label_names')
    assert torch.equal(logits(reloaded, chans=1), logits(tuned, chans=1))

    # failures leave OUT as it was and no temp dirs
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match='does not fit'):
        convert_checkpoint(st, out, SMALL, force=True)  # depth 8 named, depth 2 given
    with pytest.raises(CheckpointError, match='no state_dict_ema'):
        convert_checkpoint(st, tmp_path / 'x', SMALL, model_kwargs=dict(depth=2), use_ema=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / 'x').exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]

    # --force replaces an earlier convert's output only: never a folder with anything else in it, nor the current one
    project = tmp_path / 'project'
    (project / 'src').mkdir(parents=True)
    (project / 'src' / 'notes.txt').write_text('mine')
    (project / 'model.safetensors').write_bytes(st.read_bytes())
    for folder, cwd, message in ((project, tmp_path, 'did not write'), (tmp_path / 'project', project, 'current'),
                                 (project, project / 'src', 'current')):
        with pytest.MonkeyPatch.context() as patch, pytest.raises(FileExistsError, match=message):
            patch.chdir(cwd)
            convert_checkpoint(project / 'model.safetensors', folder, SMALL, model_kwargs=dict(depth=2), force=True)
        assert (project / 'src' / 'notes.txt').read_text() == 'mine'


def test_nonfinite_weights_refused_by_convert_allowed_with_warning_elsewhere(tmp_path, capsys):
    """A diverged run's weights: convert names the problem and the tensors and writes nothing, unless told."""
    ref = small_model(seed=16)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd['blocks.1.1.weight'][0, 0] = float('nan')
    sd['blocks.1.1.weight'][1, 0] = float('nan')
    sd['head.bias'][3] = float('-inf')
    src = tmp_path / 'diverged.pth.tar'
    torch.save(train_py_checkpoint(sd), src)
    out = tmp_path / 'out'
    argv = ['convert', str(src), str(out), '--model', SMALL, '--model-kwargs', 'depth=2']

    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert 'non-finite values (NaN/Inf) in 2 of' in err
    assert 'blocks.1.1.weight (2 NaN), head.bias (1 Inf)' in err and '--allow-nonfinite' in err
    assert 'verification failed' not in err
    with pytest.raises(NonFiniteWeightsError, match='allow_nonfinite=True'):
        convert_checkpoint(src, out, SMALL, model_kwargs=dict(depth=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['diverged.pth.tar']  # nothing written, no temporaries

    # the same check from Python: names the first few tensors, counts the rest
    assert find_nonfinite(sd) == {'blocks.1.1.weight': (2, 0), 'head.bias': (0, 1)}
    check_finite(ref.state_dict())  # finite weights pass
    many = {f'w{i}': torch.full((2,), float('inf')) for i in range(6)}
    with pytest.raises(NonFiniteWeightsError, match=r'6 of 6 tensors: w0 \(2 Inf\), w1 .* w3 \(2 Inf\) and 2 more'):
        check_finite(many)

    with pytest.warns(NonFiniteWeightsWarning, match='converting them anyway'):
        assert cli.main(argv + ['--allow-nonfinite']) == 0
    # loading stays possible (debugging a diverged run), with a warning naming the tensors
    with pytest.warns(NonFiniteWeightsWarning, match=r'blocks\.1\.1\.weight \(2 NaN\)'):
        reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    for k, v in sd.items():
        torch.testing.assert_close(reloaded.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)
    with pytest.warns(NonFiniteWeightsWarning, match='head.bias'):
        timm.create_model(SMALL, depth=2, checkpoint_path=str(src))


def test_cli_convert_and_push_to_hub_look_alike(hub, tmp_path, run_python):
    """The installed console script, env-configured, publishes; the published repo loads via hf-hub:."""
    ref = small_model(seed=14)
    src = tmp_path / 'ckpt.pth.tar'
    torch.save(train_py_checkpoint(ref.state_dict()), src)
    script = Path(sys.executable).with_name('timm-convmixer')
    assert script.exists(), 'the package installs a timm-convmixer console script'
    env = dict(os.environ, **subprocess_env(hub, tmp_path))
    result = subprocess.run(
        [str(script), 'convert', str(src), str(tmp_path / 'pub'), '--model', SMALL, '--model-kwargs', 'depth=2',
         '--push', 'me/convmixer-pushed'], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hub.count('POST', '/api/repos/create') >= 1
    assert hub.count('POST', '/api/models/me/convmixer-pushed/commit/main') == 1
    assert any('library_name: timm' in card for card in hub.validated_cards)
    assert sorted(hub.repos['me/convmixer-pushed']) == ['README.md', 'config.json', 'model.safetensors']
    published = hub.repos['me/convmixer-pushed']['model.safetensors']
    assert published == (tmp_path / 'pub' / 'model.safetensors').read_bytes()
    assert_loads_from_hub('hf-hub:me/convmixer-pushed', logits(ref), tmp_path, subprocess_env(hub, tmp_path),
                          run_python)


def test_plugin_checkpoint_loads_into_plain_timm(tmp_path, run_python):
    """Checkpoints and converted folders from the plugin load into timm's built-in ConvMixer (plugin off)."""
    name = 'convmixer_1024_20_ks9_p14'  # the cheapest of the names timm itself ships
    torch.manual_seed(15)
    ours = timm.create_model(name).eval()
    _randomize_bn(ours)
    torch.save(ours.state_dict(), tmp_path / 'ckpt.pth')
    convert_checkpoint(tmp_path / 'ckpt.pth', tmp_path / 'folder', name)
    torch.save(logits(ours, 64), tmp_path / 'expected.pt')
    code = f'''
        import sys, torch, timm
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        for kwargs in (dict(checkpoint_path={str(tmp_path / "ckpt.pth")!r}), dict(pretrained=True)):
            name = {name!r} if 'checkpoint_path' in kwargs else 'local-dir:' + {str(tmp_path / "folder")!r}
            model = timm.create_model(name, **kwargs).eval()
            assert type(model).__module__ == 'timm.models.convmixer', type(model)
            torch.manual_seed(123)
            with torch.no_grad():
                out = model(torch.randn(2, 3, 64, 64))
            torch.testing.assert_close(out, expected)
        try:
            from transformers import AutoModelForImageClassification
        except ImportError:
            print('transformers not installed')
        else:  # transformers on plain timm: the same folder, timm's built-in class
            model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "folder")!r}).eval()
            assert type(model.timm_model).__module__ == 'timm.models.convmixer', type(model.timm_model)
            assert model.config.id2label[0].startswith('tench'), model.config.id2label[0]  # ImageNet's, from timm
            torch.manual_seed(123)
            with torch.no_grad():
                torch.testing.assert_close(model(pixel_values=torch.randn(2, 3, 64, 64)).logits, expected)
        assert 'timm_convmixer' not in sys.modules
        print('OK')
    '''
    env = dict(TIMM_CONVMIXER_AUTOLOAD='0')
    assert 'OK' in run_python(code=code, env=env, cwd=REPO_ROOT, timeout=240).stdout
