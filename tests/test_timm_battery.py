"""timm's own model test battery (``tests/test_models.py`` of the installed timm's sdist) on every variant we register.

The sdist is fetched from the package registry with ``pip download`` for exactly the timm version imported here
(so the min-version CI environment runs that version's battery) and cached under ``.cache/timm-battery/``
(``TIMM_BATTERY_CACHE`` overrides). Only its ``tests/`` folder is unpacked, so the sdist's ``timm/`` sources never
shadow the installed package. It runs in a subprocess, whose plain ``import timm`` picks up our variants through
the start-up hook, selected with ``-k convmixer`` minus the two tests that download real weights.
"""
import os
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import timm
import timm_convmixer

ROOT = Path(__file__).resolve().parents[1]
SELECTION = 'convmixer and not load_pretrained and not features_pretrained'
# timm's prune-intermediate-layers contract costs 20-70 s per full-size variant (convmixer_1536_20: 69 s) and
# exercises the very same code on each (forward_intermediates / prune_intermediate_layers do not depend on width or
# kernel): it runs on the quick variants and, at full size, on convmixer_1024_20_ks9_p14 only (~19 s).
# TIMM_BATTERY_QUICK=1 (set by ./run.sh test-min) leaves out that one too: the newest timm's run covers it.
FULL_SIZE = ('convmixer_1024_20_ks9_p14', 'convmixer_1536_20', 'convmixer_768_32', 'convmixer_1536_24_ks9_p14',
             'convmixer_1024_16_ks9_p7')


def _selection() -> str:
    slow = FULL_SIZE if os.environ.get('TIMM_BATTERY_QUICK') == '1' else FULL_SIZE[1:]
    names = ' or '.join(f'{name}]' for name in slow)
    return f'{SELECTION} and not (prune_intermediate_layers_contract and ({names}))'


def _battery_dir(run_python) -> Path:
    """``<cache>/<version>/tests/test_models.py``, downloading and unpacking the sdist on first use."""
    version = timm.__version__
    cache = Path(os.environ.get('TIMM_BATTERY_CACHE', ROOT / '.cache' / 'timm-battery'))
    dest = cache / version
    if (dest / 'tests' / 'test_models.py').is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        proc = run_python('-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:', '--dest', tmp,
                          f'timm=={version}', timeout=600, check=False)
        archives = list(Path(tmp).glob('timm-*.tar.gz'))
        if proc.returncode != 0 or not archives:
            pytest.fail(f'could not fetch the timm {version} sdist from the package registry '
                        f'(pip download rc={proc.returncode}):\n{proc.stderr[-2000:]}')
        staged = Path(tmp) / 'staged'
        with tarfile.open(archives[0]) as tf:
            prefix = f'{tf.getnames()[0].split("/")[0]}/tests/'
            members = [m for m in tf.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix) - len('tests/'):]
            tf.extractall(staged, members=members, filter='data')
        # an empty ini here stops pytest from picking up this project's configuration above it
        (staged / 'pytest.ini').write_text('[pytest]\n')
        if not (staged / 'tests' / 'test_models.py').is_file():
            pytest.fail(f'timm {version} sdist has no tests/test_models.py')
        os.replace(staged, dest)  # atomic: a half-unpacked battery is never mistaken for a complete one
    return dest


@pytest.mark.timm_battery
@pytest.mark.slow
def test_timm_model_battery_passes_for_every_variant(tmp_path, run_python):
    battery = _battery_dir(run_python)
    report = tmp_path / 'junit.xml'
    proc = run_python(
        '-m', 'pytest', 'tests/test_models.py', '-k', _selection(), '-q', '-p', 'no:cacheprovider',
        f'--junitxml={report}', '--tb=short',
        unset=['TIMM_CONVMIXER_AUTOLOAD'], cwd=battery, timeout=3000, check=False)  # the hook must be on
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    if proc.returncode != 0:  # the failing cases by name first: a tensor's repr can fill the whole tail
        failed = [c.get('name') for c in ET.parse(report).getroot().iter('testcase')
                  if {child.tag for child in c} & {'failure', 'error'}] if report.is_file() else []
        pytest.fail(f"timm's battery failed: {', '.join(failed) or 'see below'}\n{tail}")

    cases = ET.parse(report).getroot().iter('testcase')
    passed, skipped = [], []
    for case in cases:
        outcome = {child.tag for child in case}
        if outcome & {'failure', 'error'}:
            pytest.fail(f"{case.get('name')} failed:\n{tail}")
        (skipped if 'skipped' in outcome else passed).append(case.get('name'))
    for name in timm_convmixer.list_variants():
        ran = [t for t in passed if f'{name}]' in t]
        assert ran, f"timm's battery ran no passing test for {name}:\n{tail}"
    print(f"timm {timm.__version__} battery: {len(passed)} passed, {len(skipped)} skipped")
