"""The ``handprop`` command: parsing and printing only.

Each subcommand lives in its own module of this package and imports the workflow it
drives inside the command function, so that ``handprop train`` never pays for importing
scikit-learn or matplotlib. A :class:`~handprop.errors.HandpropError` is printed as one
line on stderr with exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from handprop import __version__
from handprop.errors import HandpropError

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
)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HandpropError as exc:
            click.echo(f"handprop: error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="handprop")
def main() -> None:
    """Neural networks with every gradient derived and written by hand."""
    from handprop.nn.threads import get_threads

    get_threads()  # a bad HANDPROP_THREADS is reported now, before any file is written


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"handprop.cli.{_name}").command)
