"""The command line: click commands and rich rendering. The only place that prints.

Errors are caught in exactly one place (``CompactorGroup.main``) and shown as one message
with a hint; ``--debug`` (or COMPACTOR_DEBUG=1) prints the traceback before it; the exit
code is the same either way.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from compactor.errors import (
    EXIT_INTERRUPTED,
    EXIT_PASS,
    EXIT_TERMINATED,
    EXIT_USAGE,
    CompactorError,
)
from compactor.version import __version__


def _debug(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("COMPACTOR_DEBUG", "") not in ("", "0")


def show_error(message: str, hint: str | None = None) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    if hint:
        click.secho(f"hint: {hint}", fg="yellow", err=True)


def _resume_command(args: list[str]) -> str:
    """The command line that was run, with --resume."""
    import shlex

    return shlex.join(["compactor", *[a for a in args if a != "--resume"], "--resume"])


class _SigtermAsInterrupt:
    """While a command runs, SIGTERM (a CI runner's cancel, a service manager's stop) raises
    KeyboardInterrupt like Ctrl-C, so every command stops the same clean way: temporary
    files removed, an older artifact kept, the ``resume with:`` line; the exit code is 143
    instead of 130. Only the main thread can install handlers; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.fired = False
        self._old = None

    def _handler(self, _signum, _frame) -> None:
        self.fired = True
        raise KeyboardInterrupt("stopped by SIGTERM")

    def __enter__(self) -> _SigtermAsInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def _stopped_by_sigterm(e: BaseException | None) -> bool:
    """Whether an interrupt came from SIGTERM: a training loop turns SIGTERM into a stop at
    its next safe point and raises ``KeyboardInterrupt("...: stopped by SIGTERM")``."""
    seen = 0
    while e is not None and seen < 10:
        if "stopped by SIGTERM" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class CompactorGroup(click.Group):
    """Runs commands and turns every way they can end into an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = _debug(args)
        sigterm = _SigtermAsInterrupt()
        try:
            with sigterm:
                rv = super().main(args=args, prog_name=prog_name or "compactor",
                                  complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.ClickException as e:
            e.show()
            code = EXIT_USAGE
        except (KeyboardInterrupt, click.exceptions.Abort) as e:
            terminated = sigterm.fired or _stopped_by_sigterm(e)
            click.secho(f"interrupted{' (SIGTERM)' if terminated else ''}: nothing was written "
                        "over an earlier artifact", err=True, fg="yellow")
            # pipeline.RunInterrupted (click wraps it in Abort): saved work can be resumed
            if getattr(e, "resumable", False) or getattr(e.__cause__, "resumable", False):
                click.secho(f"resume with: {_resume_command(args)}", err=True, fg="yellow")
            code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        except CompactorError as e:
            if debug:  # the traceback, then the same error and exit code as without --debug
                traceback.print_exc(file=sys.stderr)
            show_error(e.message, e.hint)
            code = e.exit_code
        except Exception as e:  # noqa: BLE001 - last resort: a bug, shown without a traceback
            if debug:
                traceback.print_exc(file=sys.stderr)
            show_error(f"internal error: {type(e).__name__}: {e}",
                       "this is a bug in compactor; rerun with --debug and report the traceback")
            code = EXIT_PASS
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=CompactorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compactor")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compress trained models (prune, distill, export, int8) and prove they fit their
    hardware budgets.

    \b
    Exit codes: 0 ok; 1 a budget or check failed; 2 usage or recipe error;
    3 model or data could not be loaded; 4 a pass or measurement failed; 130 interrupted
    (Ctrl-C); 143 stopped by SIGTERM.
    """
    import logging

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from compactor.cli import (
        bench_cmd,
        check_cmd,
        deploy_cmd,
        inspect_cmd,
        optimize_cmd,
        partition_cmd,
        profiles_cmd,
        recipe_cmd,
        sensitivity_cmd,
    )

    cli.add_command(optimize_cmd.optimize)
    cli.add_command(check_cmd.check)
    cli.add_command(bench_cmd.bench)
    cli.add_command(recipe_cmd.recipe)
    cli.add_command(inspect_cmd.inspect)
    cli.add_command(profiles_cmd.profiles)
    cli.add_command(partition_cmd.partition)
    cli.add_command(sensitivity_cmd.sensitivity)
    cli.add_command(deploy_cmd.package)
    cli.add_command(deploy_cmd.publish)
    cli.add_command(deploy_cmd.versions)
    cli.add_command(deploy_cmd.rollback)


_register()


def main() -> None:
    cli.main()
