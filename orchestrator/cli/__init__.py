"""``adareg``: the click command line. It only parses arguments and calls library functions."""

from __future__ import annotations

import os
import sys

import click

from orchestrator.errors import BadValue, UserError, one_line


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="adareg")
def cli() -> None:
    """Adapting regularization with learning rate: tapered weight decay and sparse gradients under
    warm-restarted SGD, run as crash-safe sweeps tracked in MLflow."""


def _register() -> None:
    from orchestrator.cli import report, sweep, train, tune

    for module in (train, sweep, report, tune):
        for command in module.COMMANDS:
            cli.add_command(command)


def flag(argument: str) -> str:
    """The command line's name of a library argument: ``jobs_per_gpu`` is ``--jobs-per-gpu``."""
    return "--" + argument.replace("_", "-")


def main(argv: list[str] | None = None) -> None:
    """Entry point: known errors become one ``error: ...`` line, never a traceback."""
    from orchestrator.store.provenance import set_command
    from training.config import ConfigError, DataError

    set_command(sys.argv[1:] if argv is None else argv)
    _register()
    try:
        rc = cli.main(args=argv, prog_name="adareg", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except BadValue as e:  # the library names the argument; here it is a flag
        click.echo(f"error: {e.spelled(flag)}", err=True)
        sys.exit(e.exit_code)
    except (UserError, ConfigError, DataError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # the last line of defence: still one line, the traceback on request
        from orchestrator.diskfault import disk_fault

        if (fault := disk_fault(e)) is not None:  # a full or read-only disk (a report's output, say)
            click.echo(f"error: {fault.describe()}; make room and run the same command again", err=True)
            sys.exit(75)
        if os.environ.get("ADAREG_DEBUG"):
            raise
        click.echo(f"error: unexpected {type(e).__name__}: {one_line(e)} (set ADAREG_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
