"""The ``handprop`` command: parsing and printing only.

Each subcommand lives in its own module of this package and imports the workflow it
drives inside the command function, so that ``handprop train`` never pays for importing
scikit-learn or matplotlib. A :class:`~handprop.errors.HandpropError` is printed as one
line on stderr with exit status 1, and so is an OSError (a full disk, an unreadable
file) or a MemoryError that no workflow named; anything else is a bug and keeps its
traceback. Ctrl-C exits 130, SIGTERM 143 and SIGHUP 129, after the same clean-up.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator

import click

from handprop import __version__
from handprop.errors import HandpropError, Interrupted

#: modules of this package that each define ``command`` (a click command or group)
COMMAND_MODULES = (
    "data",
    "train",
    "predict",
    "experiments",
    "evaluate",
    "compare",
    "figures",
    "report",
    "serve",
    "export",
)


def positive_seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A click callback: the option's value as a finite number of seconds > 0.

    Read here rather than by click's FloatRange, which lets "nan" through (NaN fails
    every comparison, so no bound refuses it) and "inf" too, and whose refusals are a
    usage message: this is one ``handprop: error:`` line naming the option and value.
    """
    from handprop.errors import ConfigError

    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{param.opts[0]} must be a finite number of seconds > 0, got {value!r}")
    return seconds


#: ``--checkpoint-every SECONDS``, shared by ``train`` and ``experiments``
checkpoint_every = click.option(
    "--checkpoint-every",
    metavar="SECONDS",
    default="60",
    show_default=True,
    callback=positive_seconds,
    help="Seconds between a run's checkpoints (written at epoch boundaries).",
)

#: what every ``--device`` option says first
DEVICE_HELP = (
    "Where the network computes: cpu (NumPy) or cuda (CuPy on an NVIDIA GPU; "
    "pip install 'handprop[gpu]')."
)


def device_option_saying(more: str):
    """``--device cpu|cuda`` with :data:`DEVICE_HELP`, then ``more`` (what the device
    means to this command); checked by :func:`check_device_name` and :func:`use_device`
    (one ``handprop: error:`` line, not click's usage message)."""
    return click.option("--device", metavar="cpu|cuda", help=f"{DEVICE_HELP} {more}")


#: ``--device cpu|cuda`` of the commands that read a config (``train``, ``experiments``)
device_option = device_option_saying("Overrides the config's device.")


def check_device_name(device: str) -> None:
    """Refuse a ``--device`` that is none of the devices' names, in one line."""
    from handprop.config import DEVICE_NAMES, device_hint
    from handprop.errors import ConfigError

    if device not in DEVICE_NAMES:
        hint = device_hint(device)
        raise ConfigError(
            f"--device must be one of {', '.join(DEVICE_NAMES)}, got {device!r}"
            + (f"; {hint}" if hint else "")
        )


def use_device(device: str) -> object:
    """The array namespace of ``device``, checked now, before anything is read or
    written: an unknown name, or "cuda" without CuPy or a usable GPU, is one line."""
    from handprop.nn import backend

    check_device_name(device)
    return backend.device_namespace(device)


EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            with _terminate_like_ctrl_c():
                return super().invoke(ctx)
        except HandpropError as exc:
            _fail(str(exc), every_rank=getattr(exc, "every_rank", False))
        except BrokenPipeError:
            # the reader went away (`handprop data info | head -2`): nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_USER_ERROR)
        except OSError as exc:
            # what the workflows did not name themselves: still the file and the reason
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}")
        except MemoryError:
            _fail("out of memory; a smaller network, batch or input needs less")
        except Interrupted as exc:
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)


def _fail(message: str, every_rank: bool = False) -> None:
    """Print ``message`` (``handprop: error: ...``, a line each) and exit 1.

    Under MPI the ranks end together, rank 0 printing, when they all know of the error
    (``every_rank``: each raised it alike; or they agree on it at start-up, see
    :mod:`handprop.scale.mpi`); an error the other ranks cannot hear of ends the job
    with ``MPI_Abort``.
    """
    from handprop.scale import mpi

    world = mpi.active()
    if world is not None and world.size > 1:
        said = world.end_together(message)  # or MPI_Abort, when the others cannot hear
        if said is None:  # another rank (rank 0) says it
            sys.exit(EXIT_USER_ERROR)
        message = said
    elif every_rank and mpi.launched_rank() != 0:
        sys.exit(EXIT_USER_ERROR)  # rank 0 says it
    for line in message.splitlines() or [""]:
        click.echo(f"handprop: error: {line}", err=True)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def _terminate_like_ctrl_c() -> Iterator[None]:
    """SIGTERM (``timeout``, ``docker stop``, SLURM) and SIGHUP (a closed terminal) stop
    a command the way Ctrl-C does: a run checkpoints, a grid writes its summary, no
    temporary file is left behind; the exit status is still 128 + the signal."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread (e.g. CliRunner)
        return
    previous = {signum: signal.signal(signum, handler) for signum in wanted}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="handprop")
def main() -> None:
    """Neural networks with every gradient derived and written by hand."""
    from handprop.nn.threads import get_threads

    get_threads()  # a bad HANDPROP_THREADS is reported now, before any file is written


def whole_summaries(command: click.Command) -> None:
    """Give ``command`` and, for a group, each of its subcommands the summary that
    command lists show in full: its own ``short_help``, else the first paragraph of its
    help, whole (click would cut that off with "..." at the terminal's width)."""
    if not command.short_help and command.help:
        command.short_help = " ".join(command.help.split("\n\n")[0].split())
    for sub in getattr(command, "commands", {}).values():
        whole_summaries(sub)


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"handprop.cli.{_name}").command)
whole_summaries(main)
