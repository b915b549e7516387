"""The terminal ``stc-bench`` writes to: one-line errors naming the fix, exit codes, output
streams that survive closed pipes, /dev/full and non-UTF-8 encodings, usage errors as one line.

``Commands`` is the command group every ``stc-bench`` command runs under: whatever goes wrong
ends in one ``error:`` line on stderr (``fail``, ``print_error``), never a usage box or a
traceback, with an exit code from this module (compare adds 3 for inconclusive). Nothing heavy is
imported here, so ``stc-bench --help`` stays instant.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
import sys
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # recent typer carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click
    from click import exceptions as click_errors

USAGE_ERROR = 2
RUN_FAILED = 1
INTERRUPTED = 130
BROKEN_PIPE = 141
"""Exit codes: usage error (one line naming the fix); a fault, with what was kept and how to go
on; Ctrl-C; standard output closed by its reader (``| head``), quietly, as a SIGPIPE'd tool."""


class Commands(TyperGroup):
    """``stc-bench``'s command group: every way a command can end badly is one ``error:`` line
    naming the fix, never a usage box or a traceback.

    ``main`` runs the commands in click's non-standalone mode and renders what comes out: usage
    errors (a bad value, an unknown command or option, a missing argument) exit 2; Ctrl-C exits
    130; standard output that its reader closed (``| head``) ends quietly; standard output that
    cannot be written (``> /dev/full``) is one error. Both the console script (``app()``) and
    typer's ``CliRunner`` come through here.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra) -> Any:
        """Run the command line (``args``, else ``sys.argv``) and exit with its code (return it when
        not ``standalone_mode``), printing at most one ``error:`` line."""
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        code = _run_guarded(lambda: super(Commands, self).main(args=argv, prog_name=prog_name, complete_var=complete_var,
                                                               standalone_mode=False, **extra), argv, self)
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx):
        """Invoke the chosen command; Ctrl-C inside it is one ``error:`` line and exit 130."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise fail("interrupted (Ctrl-C); run the command again to finish it", INTERRUPTED) from None


def _plain_width() -> int | None:
    """None (the terminal's width) on a terminal; 240 columns for files, pipes and CI logs (one line per row)."""
    try:
        return None if sys.stdout is not None and sys.stdout.isatty() else 240
    except (AttributeError, ValueError, OSError):
        return 240


console = Console(width=_plain_width())
"""Standard output: tables and the report path (240 columns when it is not a terminal)."""
err_console = Console(stderr=True)
"""Standard error: ``error:`` lines, warnings, logging and progress bars."""


def one_line(message: str) -> str:
    """``message`` on one line (line breaks of nested errors joined)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def print_error(message: str) -> None:
    """One ``error:`` line on stderr; ``message`` is printed as it is (no markup, no emoji codes)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line(message)), highlight=False, soft_wrap=True)


def fail(message: str, code: int = USAGE_ERROR) -> typer.Exit:
    """Print a one-line error naming the fix; the caller raises the returned Exit."""
    print_error(message)
    return typer.Exit(code)


def plain(text: object) -> Text:
    """User text for a rich table cell: shown as it is, never read as markup or emoji codes."""
    return Text(str(text))


# --- standard streams --------------------------------------------------------------------------

_ASCII_FALLBACK = {"\u2014": "-", "\u2013": "-", "\u2192": "->", "\u2190": "<-", "\u2705": "ok", "\u274c": "x",
                   "\u26a0": "!", "\ufe0f": "", "\u2026": "...", "\u00d7": "x", "\u00b1": "+/-", "\u00b2": "2"}
FALLBACK_ERRORS = "stc_bench_fallback"
"""Encoding-error handler of stdout and stderr: characters the stream's encoding lacks (the
reports' dashes, arrows and check marks under ``PYTHONIOENCODING=ascii`` or a Latin-1 locale,
undecodable bytes of a file name) print as ASCII look-alikes or ``?`` instead of failing."""


def _fallback(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    return "".join(_ASCII_FALLBACK.get(ch, "?") for ch in err.object[err.start:err.end]), err.end


class OutputError(Exception):
    """Writing to standard output failed (``err``): its reader closed it, or its device is full.
    Not an ``OSError``, so that nothing between the write and ``Commands.main`` takes it for a
    failed file operation (click would exit 1 on a broken pipe)."""

    def __init__(self, err: OSError):
        super().__init__(str(err))
        self.err = err


class GuardedOutput:
    """Standard output, whose write and flush failures raise ``OutputError``; the rest is the stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        """Write ``text`` to the stream; a failed write raises ``OutputError``."""
        try:
            return self._stream.write(text)
        except OSError as err:
            raise OutputError(err) from None

    def flush(self) -> None:
        """Flush the stream; a failed flush raises ``OutputError``."""
        try:
            self._stream.flush()
        except OSError as err:
            raise OutputError(err) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _prepare_streams() -> None:
    """Make the standard streams safe to write: a closed descriptor 0-2 is re-opened on /dev/null
    (so no file this process opens takes its number), strict encoders fall back to ASCII, and
    standard output's failures are told apart from those of files (``GuardedOutput``)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    codecs.register_error(FALLBACK_ERRORS, _fallback)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors=FALLBACK_ERRORS)
            except (ValueError, OSError):
                pass
    if sys.stdout is not None and not isinstance(sys.stdout, GuardedOutput):
        sys.stdout = GuardedOutput(sys.stdout)


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that what is still buffered cannot fail again at exit."""
    stream = getattr(sys.stdout, "_stream", sys.stdout)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def _output_failure(err: OSError) -> int:
    """The exit code after standard output failed: quietly 141 when its reader closed it
    (``| head``), else one error line and 1."""
    _silence_stdout()
    if isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE:
        return BROKEN_PIPE
    print_error(f"cannot write to standard output ({err.strerror or err}); redirect it to a file or a pipe that takes it")
    return RUN_FAILED


# --- usage errors ------------------------------------------------------------------------------

def _value_of(param, argv: list[str]) -> str | None:
    """The text given for ``param`` on the command line, if it can be found."""
    for i, arg in enumerate(argv):
        for opt in getattr(param, "opts", []):
            if arg == opt and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(opt + "=") and opt.startswith("--"):
                return arg[len(opt) + 1:]
    return None


def _value_kind(param) -> type | None:
    """int, float or bool where ``param`` takes one (typer's type descriptor, or click's type name)."""
    import typing

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:
        return {"integer": int, "float": float, "boolean": bool}.get(getattr(getattr(param, "type", None), "name", ""))
    return next((t for t in (annotation, *typing.get_args(annotation)) if t in (int, float, bool)), None)


def _command_of(argv: list[str], group) -> tuple[str, Any]:
    """(``stc-bench CMD``, the click command of ``group``) of a command line, or (``stc-bench``, None)."""
    name = next((a for a in argv if not a.startswith("-")), None)
    command = group.commands.get(name) if name else None
    return (f"stc-bench {name}", command) if command is not None else ("stc-bench", None)


def _example(param) -> str:
    """``, e.g. --repeats 20`` from a parameter's default (or a plain value of its kind)."""
    opt = max(getattr(param, "opts", None) or [param.name], key=len)
    default, kind = getattr(param, "default", None), _value_kind(param)
    if isinstance(default, list):
        default = default[0] if default else None
    if default is None or isinstance(default, bool) or not isinstance(default, (int, float, str)) or default == "":
        default = {int: 1, float: 1.0}.get(kind)
    return f", e.g. {opt} {default}" if default is not None else ""


def _usage_message(err, argv: list[str], group) -> str:
    """One line for a click usage error of ``group``'s command line: what was wrong and the fix."""
    path, command = _command_of(argv, group)
    see = f"see {path} --help"
    param = getattr(err, "param", None)
    message = one_line(err.format_message()).rstrip(".")
    if isinstance(err, click_errors.NoSuchOption):
        guess = f" (did you mean {', '.join(sorted(err.possibilities))}?)" if getattr(err, "possibilities", None) else ""
        return f"no such option {err.option_name}{guess}; {see} for the options"
    if isinstance(err, click_errors.MissingParameter) and param is not None:
        if getattr(param, "param_type_name", "") == "argument":
            arguments = " ".join((getattr(p, "metavar", None) or p.name).upper() for p in command.params
                                 if getattr(p, "param_type_name", "") == "argument") if command is not None else ""
            return f"missing argument {(param.name or '').upper()}; usage: {path} [OPTIONS] {arguments}".rstrip()
        return f"missing option {'/'.join(param.opts)}; give it a value{_example(param)}"
    if isinstance(err, click_errors.BadParameter) and param is not None:
        opt = max(getattr(param, "opts", None) or [param.name or "value"], key=len)
        value = _value_of(param, argv)
        noun = {int: "a whole number", float: "a number", bool: "true or false"}.get(_value_kind(param))
        shown = f" {value!r}" if value is not None else ""
        if noun:
            return f"{opt}{shown}: not {noun}; pass {noun}{_example(param)}"
        return f"{opt}{shown}: {message}; {see}"
    if message.startswith("No such command"):
        return f"{message[0].lower()}{message[1:]}; choose one of {', '.join(group.commands)} (stc-bench --help)"
    flag = re.match(r"Option '(.+?)' does not take a value", message)
    if flag:
        return f"{flag.group(1)} takes no value; write it alone, e.g. {path} {flag.group(1)}"
    extra = re.match(r"Got unexpected extra argument(?:\(s\)|s)? \((.*)\)", message)
    if extra:
        return f"unexpected argument {extra.group(1)!r}: {path} takes no more arguments (options start with --); {see}"
    needs = re.match(r"Option '(.+?)' requires an argument", message)
    if needs and command is not None:
        param = next((p for p in command.params if needs.group(1) in getattr(p, "opts", [])), None)
        if param is not None:
            return f"{needs.group(1)} needs a value{_example(param)}"
    return f"{message[0].lower()}{message[1:]}; {see}"


def _run_guarded(call, argv: list[str], group) -> int:
    """Run ``group``'s command line and map whatever comes out to an exit code, printing at most
    one ``error:`` line."""
    stdout = sys.stdout
    _prepare_streams()
    no_args_help = getattr(click_errors, "NoArgsIsHelpError", ())
    try:
        rv = call()
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        if sys.stdout is not None:
            sys.stdout.flush()
        return code
    except OutputError as err:
        return _output_failure(err.err)
    except no_args_help as err:
        err.show()
        return USAGE_ERROR
    except click_errors.UsageError as err:
        print_error(_usage_message(err, argv, group))
        return USAGE_ERROR
    except click_errors.ClickException as err:
        print_error(err.format_message())
        return err.exit_code
    except (typer.Abort, getattr(click_errors, "Abort", typer.Abort)):
        print_error("aborted; run the command again")
        return RUN_FAILED
    except KeyboardInterrupt:
        print_error("interrupted (Ctrl-C); run the command again to finish it")
        return INTERRUPTED
    except OSError as err:
        if isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE:
            return _output_failure(err)
        where = f" ({err.filename})" if err.filename else ""
        print_error(f"{err.strerror or err}{where}; check that path, its permissions and the free space, then run again")
        return RUN_FAILED
    finally:
        if isinstance(sys.stdout, GuardedOutput):
            sys.stdout = stdout
