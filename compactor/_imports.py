"""Resolving 'pkg.module:fn' and 'path/file.py:fn' references from a recipe.

User code (importing a factory's module, calling it, iterating what it returns) runs in a
box: it sees ``sys.argv`` as just the program's name, so a module that parses arguments with
argparse finds none of compactor's, and a ``sys.exit()`` / ``SystemExit`` (argparse's error
exit included) becomes a load error naming the factory instead of ending the run.
KeyboardInterrupt is not caught: Ctrl-C still stops the run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from compactor.errors import EXIT_LOAD, CompactorError, did_you_mean


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
            with user_code(error, what, f"importing {mod_ref}"):
                module = importlib.import_module(mod_ref)
        except CompactorError:
            raise
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
    return boxed(fn, error, what), source


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
        with user_code(error, what, f"importing {path.name}"):
            spec.loader.exec_module(module)
    except CompactorError:
        sys.modules.pop(name, None)
        raise
    except Exception as e:  # noqa: BLE001 - user code may raise anything
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
        with user_code(error, what, f"{getattr(fn, '__name__', fn)}()"):
            return fn(**kwargs)
    except CompactorError:
        raise
    except Exception as e:  # noqa: BLE001 - a user factory may raise anything
        raise error(
            f"{what}: {getattr(fn, '__name__', fn)}() raised {type(e).__name__}: {e}",
            "fix the factory; run with --debug for the traceback",
        ) from e


class _ArgparseExit(SystemExit):
    """argparse's error exit inside user code, carrying the message it would have printed."""


def _argparse_error(parser: Any, message: str) -> None:
    raise _ArgparseExit(2, f"{parser.prog}: error: {message}")


@contextlib.contextmanager
def user_code(error: type[CompactorError], what: str, doing: str) -> Iterator[None]:
    """Run user code with ``sys.argv`` as just the program name; a ``SystemExit`` from it is
    a load error (exit 3) naming ``what``; ``sys.argv`` is restored afterwards. argparse's
    error (usage printed, exit 2) becomes the message of that error instead of output."""
    import argparse

    saved, saved_error = sys.argv, argparse.ArgumentParser.error
    sys.argv = saved[:1] or ["compactor"]
    argparse.ArgumentParser.error = _argparse_error  # type: ignore[method-assign]
    try:
        yield
    except _ArgparseExit as e:
        raise error(
            f"{what}: {doing} parses command-line arguments, and argparse stopped it "
            f"({e.args[1]})",
            "a factory gets its settings as keyword arguments (model.args), not from the "
            "command line; move argument parsing under `if __name__ == '__main__':` — "
            "factories see sys.argv as just the program name",
            exit_code=EXIT_LOAD,
        ) from None
    except SystemExit as e:
        raise error(
            f"{what}: {doing} called sys.exit({e.code!r}) instead of returning",
            "a factory must return its value, not exit; move command-line code (argparse, "
            "sys.exit) under `if __name__ == '__main__':`",
            exit_code=EXIT_LOAD,
        ) from None
    finally:
        sys.argv = saved
        argparse.ArgumentParser.error = saved_error  # type: ignore[method-assign]


def boxed(fn: Callable[..., Any], error: type[CompactorError], what: str) -> Callable[..., Any]:
    """``fn`` called inside :func:`user_code` (its attributes, e.g. ``higher_is_better``,
    kept)."""
    if getattr(fn, "__compactor_boxed__", False):
        return fn

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with user_code(error, what, f"{getattr(fn, '__name__', fn)}()"):
            return fn(*args, **kwargs)

    call.__compactor_boxed__ = True  # type: ignore[attr-defined]
    return call


def iterate_user(items: Iterable[Any], error: type[CompactorError], what: str) -> Iterator[Any]:
    """Iterate what a factory returned (often a generator: more user code), each step boxed."""
    it = iter(items)
    while True:
        with user_code(error, what, "iterating its batches"):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item
