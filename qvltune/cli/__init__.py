"""The ``qvltune`` command line: one thin module per command, one error boundary (``main``).

Exit codes: 0 success, 1 a problem the user can fix (``Error: ...`` + ``Hint: ...``), 2 usage,
130 interrupted. ``QVLTUNE_DEBUG=1`` shows tracebacks of unexpected errors.
"""

from __future__ import annotations

import os
import sys

import typer
import typer.core

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
    # Plain click help: it wraps each flag's text beside the flag at any width (Rich's panels cut
    # long flag names at 80 columns) and shows no type markers such as <bool>.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qvltune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")) -> None:
    pass


# One placeholder per kind of value, in every command's help (click would mix <str>, <int range>,
# PATH): upper case names what to give; choices are listed as a|b|c.
_METAVARS = {
    "--model": "MODEL", "--base": "MODEL", "--data": "FILE", "--answers": "FILE", "--image": "IMG",
    "--image-root": "DIR", "--out": "DIR", "--path": "DIR", "--name": "NAME", "--gpu": "NAME",
    "--prompt": "TEXT", "--gpu-memory": "GB", "--epochs": "N", "--max-shard-size": "SIZE",
}


def _metavar(param) -> str:
    long = max(param.opts, key=len)
    if long in _METAVARS:
        return _METAVARS[long]
    desc = getattr(param, "type_descriptor", None)
    if desc is None:  # Typer before its vendored click (e.g. 0.2x): read click's own ParamType
        choices = getattr(param.type, "choices", None)
        if choices:
            return "|".join(str(getattr(c, "value", c)) for c in choices)
        kind = {"integer": "int", "float": "float", "path": "Path"}.get(param.type.name, "str")
    elif desc.is_choice:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    else:
        kind = param.bare_type()
    if kind in ("int", "float"):
        return "N"
    if kind in ("Path", "PosixPath"):
        return "PATH"
    return "TEXT"


class _Command(typer.core.TyperCommand):
    """Typer's command with consistent placeholders in --help (see _METAVARS)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        for param in self.params:
            # By duck type: Typer may vendor its own click, whose classes are not click's.
            if param.param_type_name == "option" and not param.is_flag and not param.count:
                if param.metavar is None or param.metavar.islower() and "|" not in param.metavar:
                    param.metavar = _metavar(param)
            elif param.param_type_name == "argument":
                param.metavar = param.metavar or param.name.upper()
                # The placeholder says it all: no "<str>" beside it, and DATA rather than {DATA} in usage.
                param.display_type_rich = lambda ctx: None
                param._usage_display_name = lambda name=param.metavar: name


def _register() -> None:
    from qvltune.cli import check_data, convert_boxes, demo, train
    from qvltune.cli import eval as eval_cmd
    from qvltune.cli import merge, predict
    from qvltune.cli import doctor, estimate, init

    for name, module in (
        ("doctor", doctor), ("check-data", check_data), ("convert-boxes", convert_boxes), ("init", init), ("estimate", estimate),
        ("train", train), ("merge", merge), ("predict", predict), ("eval", eval_cmd), ("demo", demo),
    ):
        app.command(name, cls=_Command)(module.command)


_register()


class _DropAcceleratorGuess:
    """DeepSpeed's "Setting accelerator to CPU. If you have GPU ..." warning, printed on import
    without a GPU: doctor reports the GPUs itself, and it is noise in every other command. The
    worker keeps its logger untouched (its log is train.log)."""

    def filter(self, record) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def _quiet_deepspeed() -> None:
    import logging

    # The logger DeepSpeed creates on import ("DeepSpeed"); a filter set now stays on it.
    logging.getLogger("DeepSpeed").addFilter(_DropAcceleratorGuess())


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the single place where exceptions become messages and exit codes."""
    _quiet_deepspeed()
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


def entry() -> None:
    """The ``qvltune`` command and ``python -m qvltune``: ``main``, then the process ends without
    finalizing the interpreter (qvltune.process_exit). ``main`` itself stays an ordinary function
    that raises SystemExit, for the tests that call it in-process."""
    from qvltune.process_exit import end_process, exit_code

    try:
        main()
        code = 0
    except SystemExit as e:
        code = exit_code(e)
    end_process(code)
