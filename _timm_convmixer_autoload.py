"""Auto-loading of timm model plugins: after ``import timm`` finishes, load every ``timm.models`` entry point.

A top-level module, not part of the ``timm_convmixer`` package, because importing that package imports torch and
timm. The wheel puts this file and ``timm_convmixer_autoload.pth`` at the top of site-packages (an editable install
finds it in the source tree); ``site`` runs the ``.pth`` line at start-up, which imports this module (standard
library only) and calls :func:`install`, the shape of setuptools' ``distutils-precedence.pth``. :func:`install`
only puts a small finder at the front of ``sys.meta_path``. Nothing else happens until something imports ``timm``:

* the finder lets the normal machinery find ``timm`` and wraps that one loader's ``exec_module``;
* once timm's ``__init__`` has run completely, every entry point in the ``timm.models`` group is loaded (each
  plugin's registration module imports and registers its models), then the finder removes itself;
* if timm is missing or its import fails, the finder does nothing and the original error surfaces unchanged;
* a plugin that raises is reported with a warning naming it; ``import timm`` still succeeds;
* :func:`install` itself never raises: start-up must not break over the hook.

``TIMM_CONVMIXER_AUTOLOAD=0`` (or false/no/off) turns the hook off; ``import timm_convmixer`` still registers.
"""
import os
import sys

ENTRY_POINT_GROUP = 'timm.models'
DISABLE_ENV = 'TIMM_CONVMIXER_AUTOLOAD'
_FALSY = ('0', 'false', 'no', 'off')


def autoload_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, '1').strip().lower() not in _FALSY


def load_plugins(group: str = ENTRY_POINT_GROUP) -> list:
    """Load every entry point of ``group``; return the names loaded. A failing plugin is warned about, skipped."""
    import warnings
    from importlib.metadata import entry_points
    try:
        eps = entry_points(group=group)
    except TypeError:  # Python < 3.10 API
        eps = entry_points().get(group, [])
    loaded, seen = [], set()
    for ep in eps:
        if ep.value in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.value)
        try:
            ep.load()
        except Exception as e:  # never let one plugin break `import timm`
            warnings.warn(
                f'timm plugin {ep.name!r} ({ep.value}) from entry-point group {group!r} failed to load: '
                f'{type(e).__name__}: {e}', RuntimeWarning, stacklevel=2)
        else:
            loaded.append(ep.name)
    return loaded


class TimmImportHook:
    """A ``sys.meta_path`` finder that runs :func:`load_plugins` right after ``timm`` has been imported."""

    target = 'timm'

    def __init__(self) -> None:
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target or self._finding:
            return None
        self._finding = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, 'find_spec'):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec  # timm missing (or exotic): the normal error/path, untouched
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)  # any error importing timm propagates as it would without us
            try:
                del loader.exec_module
            except AttributeError:
                pass
            self.remove()
            if autoload_enabled():
                load_plugins()

        loader.exec_module = exec_module  # an instance attribute: the loader's class is unchanged
        return spec

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def install() -> None:
    """Arm the hook (idempotent). If timm is already imported there is nothing to wait for: load now.

    Called from the ``.pth`` line at start-up, so it never raises: a broken hook costs the auto-registration (``import
    timm_convmixer`` still registers), never the interpreter.
    """
    try:
        if not autoload_enabled():
            return
        if any(type(f).__name__ == 'TimmImportHook' for f in sys.meta_path):
            return
        if 'timm' in sys.modules:
            load_plugins()
            return
        sys.meta_path.insert(0, TimmImportHook())
    except Exception:
        pass
