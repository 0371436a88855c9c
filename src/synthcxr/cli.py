"""`synthcxr` command line: maps commands to stage functions, holds no logic of its own.

Heavy libraries (torch, diffusers) are imported inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from synthcxr import __version__
from synthcxr.data.commands import app as data_app
from synthcxr.demo import demo
from synthcxr.evaluate.commands import evaluate
from synthcxr.generate.commands import generate
from synthcxr.grid.commands import grid
from synthcxr.models.commands import app as model_app
from synthcxr.privacy.commands import app as privacy_app
from synthcxr.release.commands import export_dataset
from synthcxr.report.commands import report
from synthcxr.study.commands import app as study_app
from synthcxr.train.commands import train

app = typer.Typer(
    name="synthcxr",
    help="Fine-tune Stable Diffusion into a synthetic chest X-ray generator, and measure how good it is.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"synthcxr {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False,
) -> None:
    """synthcxr: data -> train -> generate -> evaluate -> study -> report."""
    import logging

    from synthcxr.logging_utils import setup_logging

    _state["debug"] = debug
    setup_logging(logging.DEBUG if verbose else logging.INFO)


app.add_typer(data_app, name="data", help="Read, check and split chest X-ray data sets.")
app.add_typer(model_app, name="model", help="Model utilities (tiny test models, inspection).")
app.add_typer(privacy_app, name="privacy", help="Patient re-identification network (train-reid).")
app.command("train", help="Fine-tune a model (DreamBooth, LoRA, full) from a YAML config.")(train)
app.command("generate", help="Generate synthetic chest X-rays (PNG or DICOM) from a model or run.")(generate)
app.command("export-dataset", help="Export generated images as a loadable data set (image folder, Parquet, WebDataset) with its card.")(export_dataset)
app.command("evaluate", help="FID/KID, precision/recall, diversity, memorization and utility.")(evaluate)
app.add_typer(study_app, name="study", help="Blinded reader study web app for realism ratings.")
app.command("grid", help="Run a grid of experiments (train -> generate -> evaluate), resumable.")(grid)
app.command("report", help="Build one HTML report comparing runs.")(report)
app.command("demo", help="Run the whole pipeline on a tiny model and sample data (CPU, minutes).")(demo)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user-fixable errors print as one clear message (traceback only with --debug)."""
    from synthcxr.errors import SynthCXRError

    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:  # `raise typer.Exit(n)` is returned, not raised, without standalone mode
            sys.exit(rc)
    except SynthCXRError as exc:
        if _state["debug"]:
            raise
        from rich.text import Text

        from synthcxr.logging_utils import console

        style = "bold red" if exc.label == "error" else "bold yellow"
        console.print(Text(f"{exc.label}: ", style=style) + Text(exc.render()), highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here with standalone_mode=False
        import click

        # typer >= 0.20 raises its vendored click's exceptions (typer._click), not click's own
        click_errors: tuple[type, ...] = (click.exceptions.ClickException,)
        try:
            from typer import _click as vendored_click

            click_errors += (vendored_click.exceptions.ClickException,)
        except ImportError:
            pass
        if isinstance(exc, click_errors):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
