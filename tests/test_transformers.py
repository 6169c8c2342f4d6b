""" transformers reads what ``convert`` writes: Auto classes and ``pipeline('image-classification')``

Many people meet timm models only through transformers, whose ``TimmWrapper*`` classes read a timm folder's
``config.json`` and call ``timm.create_model``; our variants are there through the plugin's entry point. These tests
run the real transformers package on a converted folder of a variant plain timm does not know
(``convmixer_256_8_ks5_p2``) with an architecture override (``--model-kwargs depth=2 dim=32``): from the local folder
in this process, and from the loopback Hub look-alike (``hub_server.py``) after a push, in a subprocess configured
through the environment as a user's would be. The weights must be bit for bit timm's, and so the logits, up to float
rounding: transformers keeps the parameters memory-mapped from ``model.safetensors``, at addresses with another
alignment than timm's copies, and CPU convolution kernels may then sum in another order (a 1e-8 difference seen at
batch size 1).

Fixtures here (``hub``, ``converted``) are this file's own.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import timm
from timm.data import create_transform, resolve_data_config

from helpers import SMALL_VARIANT as SMALL
from hub_server import HubLookAlike
from timm_convmixer import cli, fast
from timm_convmixer.cli.convert import push_folder
from timm_convmixer.convmixer import CIFAR10_CLASSES, ConvMixer

transformers = pytest.importorskip('transformers')

ARCH = dict(depth=2, dim=32)
REPO_ROOT = Path(__file__).resolve().parents[1]


def assert_same_weights(model, ref):
    a, b = model.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_logits(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def images(n=3, size=40):
    """PIL images of a size other than the model's, so the resize/crop of both processors is exercised."""
    from PIL import Image
    g = torch.Generator().manual_seed(7)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())
            for _ in range(n)]


def timm_pixels(model, imgs):
    """What timm's own eval transform makes of ``imgs`` for ``model``."""
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    return torch.stack([transform(img) for img in imgs])


@pytest.fixture(scope='module')
def hub():
    server = HubLookAlike().start()
    yield server
    server.stop()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """A depth-2, dim-32 CIFAR ConvMixer with random BN statistics, through ``timm-convmixer convert``."""
    from safetensors.torch import save_file
    tmp = tmp_path_factory.mktemp('transformers')
    torch.manual_seed(21)
    ref = timm.create_model(SMALL, **ARCH).eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    save_file(ref.state_dict(), str(tmp / 'cifar.safetensors'))
    folder = tmp / 'convmixer-cifar'
    argv = ['convert', str(tmp / 'cifar.safetensors'), str(folder), '--model', SMALL,
            '--model-kwargs', *(f'{k}={v}' for k, v in ARCH.items())]
    assert cli.main(argv) == 0
    return folder, ref


def test_config_json_reads_the_same_in_timm_and_transformers(converted):
    from transformers import AutoConfig
    folder, ref = converted
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == SMALL and config['num_classes'] == 10
    assert 'num_classes' not in config['model_args']  # transformers passes num_classes=num_labels beside model_args
    assert {k: config['model_args'][k] for k in ARCH} == ARCH
    assert config['label_names'] == list(CIFAR10_CLASSES)

    hf_config = AutoConfig.from_pretrained(folder)
    assert hf_config.model_type == 'timm_wrapper' and hf_config.architecture == SMALL
    assert hf_config.num_labels == 10
    assert [hf_config.id2label[i] for i in range(10)] == list(CIFAR10_CLASSES)
    assert hf_config.label2id['truck'] == 9

    local = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert local.pretrained_cfg['label_names'] == list(CIFAR10_CLASSES)
    assert local.num_classes == 10 and len(local.blocks) == 2 and local.num_features == 32


def test_auto_classes_and_pipeline_give_timms_logits(converted):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
    folder, ref = converted
    local = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32)

    classifier = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(classifier.timm_model) is ConvMixer and len(classifier.timm_model.blocks) == 2
    assert_same_weights(classifier.timm_model, ref)
    backbone = AutoModel.from_pretrained(folder).eval()
    assert type(backbone.timm_model) is ConvMixer and backbone.timm_model.num_classes == 0
    with torch.no_grad():
        expected = ref(x)
        assert torch.equal(local(x), expected)
        assert_same_logits(classifier(pixel_values=x).logits, expected)
        assert_same_logits(classifier(pixel_values=x[:1]).logits, expected[:1])
        pooled = backbone(pixel_values=x).pooler_output
        assert_same_logits(pooled, ref.forward_head(ref.forward_features(x), pre_logits=True))

    imgs = images()
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(imgs, return_tensors='pt')['pixel_values']
    assert torch.equal(pixels, timm_pixels(local, imgs))  # CIFAR mean/std, 32px, bilinear, crop 1.0

    classify = pipeline('image-classification', model=str(folder))
    got = classify(imgs, top_k=3)
    with torch.no_grad():
        probs = local(timm_pixels(local, imgs)).softmax(-1)
    for answer, p in zip(got, probs):
        top = p.topk(3)
        assert [a['label'] for a in answer] == [CIFAR10_CLASSES[i] for i in top.indices]
        assert [a['score'] for a in answer] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_pushed_repo_loads_in_transformers_timm_and_pipeline(converted, hub, tmp_path, monkeypatch):
    """A user's view of a pushed repo: HF_ENDPOINT/HF_HOME in the environment, repo id as the only name."""
    from huggingface_hub import constants
    folder, ref = converted
    monkeypatch.setattr(constants, 'ENDPOINT', hub.endpoint)
    monkeypatch.setenv('HF_TOKEN', 'dummy-token')
    push_folder(folder, 'me/convmixer-cifar-tf')
    assert sorted(hub.repos['me/convmixer-cifar-tf']) == ['README.md', 'config.json', 'model.safetensors']
    assert 'pipeline("image-classification"' in hub.repos['me/convmixer-cifar-tf']['README.md'].decode()

    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    # compared bit for bit in another process: through the plain modules on both sides, since auto picks a path by
    # timing and two processes may pick differently (equal to ~1e-7, not bitwise)
    with torch.no_grad(), fast.use_backend('eager'):
        torch.save(ref(x), tmp_path / 'expected.pt')
    # transformers imports timm itself: the plugin's entry point must register the variant on that plain import
    code = f'''
        import torch
        from transformers import AutoModelForImageClassification, pipeline
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = AutoModelForImageClassification.from_pretrained('me/convmixer-cifar-tf').eval()
        assert type(model.timm_model).__module__ == 'timm_convmixer.convmixer', type(model.timm_model)
        import timm
        remote = timm.create_model('hf-hub:me/convmixer-cifar-tf', pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=x).logits, expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(remote(x), expected)
        theirs, ours = model.timm_model.state_dict(), remote.state_dict()
        assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
        from PIL import Image
        image = Image.new('RGB', (48, 40), (200, 30, 30))
        answer = pipeline('image-classification', model='me/convmixer-cifar-tf')(image, top_k=10)
        assert sorted(a['label'] for a in answer) == sorted({list(CIFAR10_CLASSES)!r}), answer
        print('OK')
    '''
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_DISABLE_XET='1',
               HF_HUB_DISABLE_TELEMETRY='1', HF_TOKEN='dummy-token',
               TIMM_CONVMIXER_BACKEND='eager')  # as many threads as this process (conftest): bitwise logits
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=240, cwd=str(REPO_ROOT))
    assert result.returncode == 0 and 'OK' in result.stdout, result.stdout + result.stderr
    # transformers pins the revision once (repo info), then fetches every file at that commit
    assert hub.count('GET', '/api/models/me/convmixer-cifar-tf') >= 1
    commit = hub.commit_hash('me/convmixer-cifar-tf')
    assert hub.count('GET', f'/me/convmixer-cifar-tf/resolve/{commit}/model.safetensors') >= 1
