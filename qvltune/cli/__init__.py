"""The ``qvltune`` command line: one thin module per command, one error boundary (``main``).

Exit codes: 0 success, 1 a problem the user can fix (``Error: ...`` + ``Hint: ...``), 2 usage,
130 interrupted. ``QVLTUNE_DEBUG=1`` shows tracebacks of unexpected errors.
"""

from __future__ import annotations

import os
import sys

import typer

from qvltune import __version__
from qvltune.console import error
from qvltune.errors import UserError

# Typer may vendor its own copy of click: take the exception classes from typer's own hierarchy.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

app = typer.Typer(
    name="qvltune",
    help="Fine-tune Qwen3-VL: check your data, plan the run, train with DeepSpeed, merge and verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qvltune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")) -> None:
    pass


def _register() -> None:
    from qvltune.cli import check_data, convert_boxes, demo, train
    from qvltune.cli import eval as eval_cmd
    from qvltune.cli import merge, predict
    from qvltune.cli import doctor, estimate, init

    app.command("check-data")(check_data.command)
    app.command("convert-boxes")(convert_boxes.command)
    app.command("init")(init.command)
    app.command("estimate")(estimate.command)
    app.command("train")(train.command)
    app.command("merge")(merge.command)
    app.command("predict")(predict.command)
    app.command("eval")(eval_cmd.command)
    app.command("demo")(demo.command)
    app.command("doctor")(doctor.command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the single place where exceptions become messages and exit codes."""
    try:
        result = app(args=argv, standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except UserError as e:
        error(e.message, e.hint)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        error("interrupted")
        code = 130
    except _ClickException as e:  # usage errors: bad flags, missing arguments
        e.show()
        code = 2 if isinstance(e, _UsageError) else e.exit_code
    except Exception as e:  # a bug: one line unless asked for the traceback
        if os.environ.get("QVLTUNE_DEBUG"):
            raise
        error(f"unexpected {type(e).__name__}: {e}", "set QVLTUNE_DEBUG=1 to see the traceback, and please report it")
        code = 1
    sys.exit(code)
