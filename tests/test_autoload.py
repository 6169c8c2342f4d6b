"""The start-up hook: a plain ``import timm`` registers our variants, and nothing about start-up can break.

Every check runs a fresh interpreter, since the hook acts at start-up and at the first ``import timm``.
"""
import functools
import json
import os
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import timm

import timm_convmixer

ROOT = Path(__file__).resolve().parents[1]
PTH = ROOT / 'timm_convmixer' / 'timm_convmixer_autoload.pth'
HOOK_MODULE = '_timm_convmixer_autoload'  # the top-level module the .pth line imports
VARIANTS = sorted(timm_convmixer.list_variants())


@pytest.fixture
def run(run_python):
    """A fresh interpreter with the hook in its default state (``TIMM_CONVMIXER_AUTOLOAD`` unset), started outside
    the repository so its folder does not shadow the installed package."""
    return functools.partial(run_python, unset=['TIMM_CONVMIXER_AUTOLOAD'], cwd=ROOT.parent)


def _installed_pth() -> Path:
    import site
    for d in site.getsitepackages():
        p = Path(d) / PTH.name
        if p.exists():
            return p
    reason = 'timm-convmixer is not pip-installed in this environment (no start-up hook to test)'
    if os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes'):
        pytest.fail(reason + '; CI installs it (./run.sh), so this is a broken set-up, not a skip')
    pytest.skip(reason)


def test_plain_import_timm_sees_every_variant(run):
    _installed_pth()
    out = run(code='''
        import sys, json, warnings
        warnings.simplefilter('error')  # no "Overwriting" noise, no plugin warnings
        armed = any(type(f).__name__ == 'TimmImportHook' for f in sys.meta_path)
        heavy = [m for m in ('torch', 'timm', 'timm_convmixer') if m in sys.modules]
        import timm
        from timm.models import _registry as r
        names = sorted(timm.list_models(module='convmixer'))
        mods = sorted({r._model_entrypoints[n].__module__ for n in names})
        model = timm.create_model('convmixer_256_8_ks5_p2', dim=8, depth=1, drop_path_rate=0.1)
        print(json.dumps(dict(armed=armed, heavy=heavy, names=names, mods=mods, cls=type(model).__module__)))
    ''')
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info['armed'] and info['heavy'] == [], 'the hook must not import torch/timm/our package at start-up'
    assert info['names'] == VARIANTS
    assert info['mods'] == ['timm_convmixer.convmixer'] and info['cls'] == 'timm_convmixer.convmixer'


def test_env_var_disables_autoload_and_timm_keeps_its_own(run):
    _installed_pth()
    out = run(code='''
        import sys, timm
        print(sorted(timm.list_models(module='convmixer')))
        print(timm.models._registry._model_entrypoints['convmixer_1536_20'].__module__)
        print('timm_convmixer.convmixer' in sys.modules)
    ''', env={'TIMM_CONVMIXER_AUTOLOAD': '0'})
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(sorted(['convmixer_1536_20', 'convmixer_1024_20_ks9_p14', 'convmixer_768_32']))
    assert lines[1] == 'timm.models.convmixer' and lines[2] == 'False'
    # ...and the explicit import still registers
    out = run(code='import timm_convmixer, timm; print(len(timm.list_models(module="convmixer")))',
              env={'TIMM_CONVMIXER_AUTOLOAD': 'off'})
    assert out.stdout.strip() == str(len(VARIANTS))


def test_import_timm_convmixer_first_then_timm(run):
    out = run(code='import timm_convmixer; import timm; print(len(timm.list_models("convmixer*")))')
    assert out.stdout.strip() == str(len(VARIANTS))


def _hook_prelude(extra_paths) -> str:
    """Code run under ``python -S`` (no site, so no installed .pth): put paths on sys.path, then run our .pth line
    exactly as ``site`` would, to test the hook against a timm that is missing, broken or joined by other plugins."""
    return (
        'import sys\n'
        f'sys.path[:0] = {[str(p) for p in extra_paths]!r}\n'
        f'exec(open({str(PTH)!r}).read())\n'
        "assert any(type(f).__name__ == 'TimmImportHook' for f in sys.meta_path), 'hook not armed'\n"
    )


def _dependency_dirs() -> list:
    """The folders timm and torch (and so their dependencies) are imported from, timm's first: a ``-S`` interpreter
    gets them on its path without running the .pth files installed beside them."""
    import torch
    dirs = []
    for module in (timm, torch):
        d = str(Path(module.__file__).resolve().parents[1])
        if d not in dirs:
            dirs.append(d)
    return dirs


def _site_dir_with_hook(site_dir: Path, module_source=None) -> Path:
    """A site dir laid out as the wheel installs the hook: the .pth and (unless None) the module beside it."""
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / PTH.name).write_text(PTH.read_text())
    if module_source is not None:
        (site_dir / f'{HOOK_MODULE}.py').write_text(module_source)
    return site_dir


def test_timm_missing_original_error_surfaces(tmp_path, run):
    code = _hook_prelude([ROOT]) + textwrap.dedent('''
        try:
            import timm
        except ModuleNotFoundError as e:
            print('ERR', e.name)
        print('interpreter still runs')
    ''')
    # -S and no PYTHONPATH (a test environment may put a timm there): only the repository is importable
    out = run('-S', code=code, env={'PYTHONPATH': ''})
    assert 'ERR timm' in out.stdout and 'interpreter still runs' in out.stdout


def test_timm_broken_original_error_surfaces(tmp_path, run):
    fake = tmp_path / 'timm'
    fake.mkdir()
    (fake / '__init__.py').write_text('raise ImportError("timm is broken in this test")\n')
    code = _hook_prelude([ROOT, tmp_path]) + textwrap.dedent('''
        try:
            import timm
        except ImportError as e:
            print('ERR', e)
        print('interpreter still runs')
    ''')
    out = run('-S', code=code)
    assert 'ERR timm is broken in this test' in out.stdout and 'interpreter still runs' in out.stdout


def test_hook_survives_missing_package(tmp_path, run):
    """The package directory gone (a half-uninstalled env): the hook needs nothing from it at start-up, so the .pth
    line runs, arms the hook, and ``import timm`` later fails only for want of timm (only the hook is on the path)."""
    hook_source = (ROOT / f'{HOOK_MODULE}.py').read_text()
    site_dir = _site_dir_with_hook(tmp_path / 'site', hook_source)
    code = textwrap.dedent(f'''
        import sys, site
        site.addsitedir({str(site_dir)!r})
        print('armed', any(type(f).__name__ == 'TimmImportHook' for f in sys.meta_path))
        try:
            import timm_convmixer
        except ModuleNotFoundError as e:
            print('ERR', e.name)
        try:
            import timm
        except ModuleNotFoundError as e:
            print('ERR', e.name)
        print('interpreter still runs')
    ''')
    out = run('-S', code=code, env={'PYTHONPATH': ''})
    assert out.stdout.split('\n')[:4] == ['armed True', 'ERR timm_convmixer', 'ERR timm', 'interpreter still runs']
    assert out.stderr == ''


@pytest.mark.parametrize('module_source', [None, 'raise RuntimeError("hook module broken")\n'],
                         ids=['module-missing', 'module-raises'])
def test_broken_hook_never_breaks_startup(tmp_path, run, module_source):
    """A damaged install (the hook module deleted, or not importable): ``site`` carries on, as for any failing .pth
    line; the interpreter starts, later .pth files still run and ``import timm`` works. ``site`` reports the failing
    line on stderr, so the damage does not go unnoticed. (The intact module never raises: ``install`` catches all.)"""
    site_dir = _site_dir_with_hook(tmp_path / 'site', module_source)
    (site_dir / 'zz_after.pth').write_text('import sys; sys.zz_after_ran = True\n')  # sorted after ours
    code = textwrap.dedent(f'''
        import sys, site
        site.addsitedir({str(site_dir)!r})
        sys.path.extend({_dependency_dirs()!r})
        print('later .pth ran', getattr(sys, 'zz_after_ran', False))
        import timm
        print('timm imported', timm.__version__)
    ''')
    out = run('-S', code=code, env={'PYTHONPATH': ''})
    later, imported = out.stdout.split('\n')[:2]
    assert later == 'later .pth ran True' and imported.startswith('timm imported')
    assert f'Error processing line 1 of {site_dir / PTH.name}' in out.stderr


def test_failing_plugin_warns_and_timm_still_imports(tmp_path, run):
    """Another plugin in the same entry-point group that raises: a warning names it; our variants still register."""
    site_dir = tmp_path / 'site'
    (site_dir / 'bad_plugin-1.0.dist-info').mkdir(parents=True)
    metadata = 'Metadata-Version: 2.1\nName: bad-plugin\nVersion: 1.0\n'
    (site_dir / 'bad_plugin-1.0.dist-info' / 'METADATA').write_text(metadata)
    (site_dir / 'bad_plugin-1.0.dist-info' / 'entry_points.txt').write_text('[timm.models]\nbad = bad_plugin_mod\n')
    (site_dir / 'bad_plugin_mod.py').write_text('raise RuntimeError("plugin exploded")\n')
    out = run(code='''
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            import timm
        print([str(w.message) for w in caught if 'plugin' in str(w.message)])
        print(len(timm.list_models(module='convmixer')))
    ''', env={'PYTHONPATH': str(site_dir)})
    lines = out.stdout.strip().splitlines()
    assert "'bad'" in lines[0] and 'plugin exploded' in lines[0]
    assert lines[1] == str(len(VARIANTS))


def test_hook_imports_nothing_heavy_and_reports_cost(run):
    """What the hook costs at start-up, measured in-process (printed; the README quotes the benchmark script)."""
    out = run('-S', code=f'''
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        before = set(sys.modules)
        line = open({str(PTH)!r}).read()
        t = time.perf_counter(); exec(line); dt = time.perf_counter() - t
        new = sorted(set(sys.modules) - before)
        print(new); print(f'{{dt * 1e3:.3f}}')
    ''')
    new_modules, cost_ms = out.stdout.strip().splitlines()
    # under -S even `os` may be new; what matters is that nothing outside the standard library is imported
    non_stdlib = [m for m in eval(new_modules) if m.split('.')[0] not in sys.stdlib_module_names]
    assert non_stdlib == [HOOK_MODULE]
    print(f'start-up hook cost: {cost_ms} ms')


def test_wheel_contains_hook_and_entry_point_and_works(tmp_path, run, run_python):
    """Build the wheel, look inside, then install it (no deps) into a separate site dir and use it from there."""
    pytest.importorskip('hatchling')
    dist = tmp_path / 'dist'
    proc = run_python('-m', 'build', '--wheel', '--no-isolation', '--outdir', dist, ROOT, timeout=600, check=False)
    if proc.returncode != 0 and 'No module named build' in proc.stderr:
        pytest.skip('the "build" package is not installed')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheel = next(dist.glob('timm_convmixer-*.whl'))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert 'timm_convmixer_autoload.pth' in names, 'the start-up hook must sit at the top of site-packages'
        assert 'timm_convmixer/timm_convmixer_autoload.pth' not in names
        assert f'{HOOK_MODULE}.py' in names, 'the module the .pth line imports must sit at the top of site-packages'
        assert 'timm_convmixer/convmixer.py' in names and 'timm_convmixer/_autoload.py' not in names
        for source in ('dw_block.cpp', 'pw_block.cpp', 'cpu_common.h'):
            assert f'timm_convmixer/fast/csrc/{source}' in names, 'the CPU kernels are compiled from shipped sources'
        ep = zf.read(next(n for n in names if n.endswith('.dist-info/entry_points.txt'))).decode()
        assert '[timm.models]' in ep and 'convmixer = timm_convmixer.convmixer' in ep
        assert 'timm-convmixer = timm_convmixer.cli:main' in ep
        assert zf.read('timm_convmixer_autoload.pth').decode() == PTH.read_text()

    target = tmp_path / 'site'
    run_python('-m', 'pip', 'install', '--no-deps', '--no-index', '--quiet', '--target', target, wheel, timeout=300)
    # no site processing (so the editable install's .pth files are ignored), then the wheel's site dir processed as
    # site would, and the folders of timm and torch put on the path without running their .pth files
    code = textwrap.dedent(f'''
        import sys, site
        site.addsitedir({str(target)!r})
        sys.path.extend({_dependency_dirs()!r})
        import timm, timm_convmixer
        print(timm_convmixer.__file__)
        print(len(timm.list_models(module='convmixer')))
    ''')
    out = run('-S', code=code, cwd=tmp_path)
    file_line, count = out.stdout.strip().splitlines()[-2:]
    assert file_line.startswith(str(target)) and count == str(len(VARIANTS))
