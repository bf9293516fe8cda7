"""handprop serve: a page to draw digits on, with the network's answer live."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("serve", short_help="A page to draw digits on and watch networks read them.")
@click.argument("source", required=False, default="runs", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port."
)
@click.option("-q", "--quiet", is_flag=True, help="No line per request.")
def command(source: Path, host: str, port: int, quiet: bool) -> None:
    """Open a page to draw digits on and watch SOURCE's networks read them.

    SOURCE is a .npz model file, a run folder, or a folder of runs (default: runs/),
    whose models a picker lists. The page shows the class probabilities, the input
    the network sees (prepared as its dataset's images were), a saliency map from
    the network's own backward pass and its first layer's activity; scripts use the
    JSON API (docs/api.md). Each request prints one line (time, method, path, status,
    milliseconds) unless --quiet. The page has no authentication: a --host other than
    this machine's (127.0.0.1, ::1), such as 0.0.0.0, lets anyone who reaches it use
    it, and serve warns so. Needs the serve extra: pip install -e ".[serve]".
    """
    from handprop.errors import ConfigError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"handprop serve needs the serve extra ({exc.name} is missing): "
            'pip install -e ".[serve]"'
        ) from None
    from handprop.serve import find_models
    from handprop.serve.app import exposure, run

    models = find_models(source)

    def ready(bound: int, address: str) -> None:
        shown = f"[{host}]" if ":" in host else host
        names = ", ".join(m.id for m in models[:5]) + (", ..." if len(models) > 5 else "")
        click.echo(
            f"handprop serve: {len(models)} model{'s' * (len(models) != 1)} ({names}) "
            f"at http://{shown}:{bound}/  (Ctrl-C stops)"
        )
        warning = exposure(host, address)
        if warning is not None:  # to stderr, after the ready line: that stays the first
            click.echo(warning, err=True)

    run(models, host, port, ready, log=None if quiet else lambda line: click.echo(line))
