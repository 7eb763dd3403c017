"""Resolving 'pkg.module:fn' and 'path/file.py:fn' references from a recipe."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compactor.errors import CompactorError, did_you_mean


def resolve_callable(
    ref: str, base_dir: Path, error: type[CompactorError], what: str
) -> tuple[Callable[..., Any], Path | None]:
    """The callable that ``ref`` names, and the source file it came from (for hashing)."""
    if ":" not in ref:
        raise error(
            f"{what} {ref!r} is not a 'module:function' reference",
            "write 'pkg.module:fn' or 'path/to/file.py:fn' (relative to the recipe)",
        )
    mod_ref, _, fn_name = ref.rpartition(":")
    if mod_ref.endswith(".py") or "/" in mod_ref or "\\" in mod_ref:
        path = Path(mod_ref).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise error(
                f"{what}: file not found: {path}",
                "paths in a recipe are relative to the recipe file's folder",
            )
        module = _load_file(path, error, what)
        source: Path | None = path
    else:
        try:
            module = importlib.import_module(mod_ref)
        except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
            raise error(
                f"{what}: cannot import module {mod_ref!r}: {type(e).__name__}: {e}",
                "is the package installed in this environment? run with --debug for the "
                "traceback",
            ) from e
        source = Path(module.__file__) if getattr(module, "__file__", None) else None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = did_you_mean(fn_name, names)
        raise error(
            f"{what}: {mod_ref!r} has no callable {fn_name!r}",
            hint or "callables there: "
            + ", ".join(n for n in names if callable(getattr(module, n))),
        )
    return fn, source


def _load_file(path: Path, error: type[CompactorError], what: str):
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"_compactor_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise error(f"{what}: cannot load {path} as a Python module", "is it a .py file?")
    module = importlib.util.module_from_spec(spec)
    # Let the file import its neighbours, as it would when run from its own folder.
    sys.path.insert(0, str(path.parent))
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        sys.modules.pop(name, None)
        raise error(
            f"{what}: importing {path.name} failed: {type(e).__name__}: {e}",
            "fix the error in that file; run with --debug for the traceback",
        ) from e
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path.parent))
    return module


def call_user(fn: Callable[..., Any], error: type[CompactorError], what: str, **kwargs: Any):
    """Call a user factory, turning its exceptions into one clear error."""
    try:
        return fn(**kwargs)
    except CompactorError:
        raise
    except Exception as e:  # noqa: BLE001
        raise error(
            f"{what}: {getattr(fn, '__name__', fn)}() raised {type(e).__name__}: {e}",
            "fix the factory; run with --debug for the traceback",
        ) from e
