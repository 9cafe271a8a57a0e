"""The ``corral`` command line.

Server commands (``up``, ``serve``, ``worker``, ``db upgrade``) run processes on this machine; the job and
model commands talk HTTP to a corral server, like the ``ollama`` CLI does.  The root group builds
:class:`Settings` once and hands it down as the context object.
"""

from __future__ import annotations

import re
import sys

import click

from cli import collections as cli_collections
from cli import embed as cli_embed
from cli import jobs as cli_jobs
from cli import keys as cli_keys
from cli import models as cli_models
from cli.client import CorralClient
from cli.common import Context, pass_ctx, with_client
from corral.errors import CorralError

JOB_ID = re.compile(r"^(job|batch)_[0-9a-f]{24}$")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def main() -> None:
    """corral: an Ollama-compatible server with durable batch jobs."""


@main.command()
@click.option("--host", help="Address to bind (default from OLLAMA_HOST, else 127.0.0.1).")
@click.option("--port", type=int, help="Port to bind (default from OLLAMA_HOST, else 11434).")
@pass_ctx
def up(ctx: Context, host: str | None, port: int | None) -> None:
    """Run everything on this machine: Redis (private if needed), the API and one worker."""
    from cli.launcher import up as run_up

    try:
        sys.exit(run_up(ctx.with_bind(host, port)))
    except (RuntimeError, CorralError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--host", help="Address to bind (default from OLLAMA_HOST, else 127.0.0.1).")
@click.option("--port", type=int, help="Port to bind (default from OLLAMA_HOST, else 11434).")
@click.option("--migrate/--no-migrate", default=True, help="Apply database migrations first.")
@pass_ctx
def serve(ctx: Context, host: str | None, port: int | None, migrate: bool) -> None:
    """Run the API server only (needs REDIS_URL and at least one worker)."""
    from api.server import serve as run_serve
    from cli.launcher import migrate as migrate_database
    from corral.modelstore.catalog import ensure_defaults
    from corral.modelstore.store import ModelStore

    settings = ctx.with_bind(host, port)
    if not settings.redis_url:
        raise click.ClickException("REDIS_URL is not set (use `corral up` to run everything with a private Redis)")
    ensure_defaults(ModelStore(settings.models_path))
    if migrate:
        migrate_database(settings)
    run_serve(settings)


@main.command()
@click.option("--gpu", type=int, help="GPU index to pin this worker to (sets CUDA_VISIBLE_DEVICES); CPU if omitted.")
@click.option("--models", help="Comma-separated models to serve (default: every model in the store).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--pull-from", metavar="URL",
    help="Copy the models to serve from this corral API (by digest, sha256-checked) instead of the local packages; "
    "for workers on machines that do not share the model store.",
)
@pass_ctx
def worker(ctx: Context, gpu: int | None, models: str | None, loglevel: str, pull_from: str | None) -> None:
    """Run one Celery worker process serving the given models."""
    from workers.main import run_worker

    if not ctx.settings.redis_url:
        raise click.ClickException("REDIS_URL is not set (use `corral up` to run everything with a private Redis)")
    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        run_worker(ctx.settings, gpu=gpu, models=names, loglevel=loglevel.upper(), pull_from=pull_from)
    except CorralError as exc:
        raise click.ClickException(exc.message) from exc


@main.group()
def db() -> None:
    """Job database commands."""


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_ctx
def db_upgrade(ctx: Context, revision: str) -> None:
    """Apply database migrations (SQLite under CORRAL_HOME, or DATABASE_URL)."""
    from sqlalchemy.exc import SQLAlchemyError

    from jobs.db import upgrade

    try:
        upgrade(ctx.settings, revision)
    except SQLAlchemyError as exc:
        reason = getattr(exc, "orig", None) or exc
        raise click.ClickException(f"cannot migrate the database: {exc.__class__.__name__}: {reason}") from exc
    click.echo(f"database at {ctx.settings.database.split('@')[-1]} is at {revision}")


for command in (*cli_jobs.COMMANDS, *cli_models.COMMANDS, *cli_embed.COMMANDS, *cli_collections.COMMANDS, cli_keys.keys):
    main.add_command(command)


@main.command()
@click.argument("targets", nargs=-1, required=True, metavar="JOB|MODEL...")
@with_client
def rm(client: CorralClient, targets: tuple[str, ...]) -> None:
    """Delete jobs (ids like job_... or batch_...) with their results, or models from the store."""
    for target in targets:
        if JOB_ID.match(target):
            client.request("DELETE", f"/api/jobs/{target}", timeout=cli_jobs.STOP_TIMEOUT)
        else:
            client.request("DELETE", "/api/delete", json={"model": target})
        click.echo(f"deleted '{target}'")

