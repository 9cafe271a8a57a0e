"""``corral keys``: API keys and what each may use, run where ``DATABASE_URL`` reaches the job database.

Limits (``--rpm``, ``--tpm``, ``--max-concurrent``, ``--max-queued-items``, ``--token-budget`` with
``--budget-period``, ``--models``) are stored on the key and enforced by every API process within seconds;
``CORRAL_KEY_LIMITS`` applies to keys without their own.  ``keys usage`` reads the daily accounting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from pydantic import ValidationError

from cli.common import Context, columns, pass_ctx
from corral.errors import CorralError


def _key_store(ctx: Context) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from jobs.db import upgrade
    from jobs.keys import KeyStore

    try:
        upgrade(ctx.settings)
    except SQLAlchemyError as exc:
        reason = getattr(exc, "orig", None) or exc
        raise click.ClickException(f"cannot open the database: {exc.__class__.__name__}: {reason}") from exc
    return KeyStore(ctx.settings)


LIMIT_OPTIONS = (
    click.option("--rpm", type=int, help="Requests per minute."),
    click.option("--tpm", type=int, help="Prompt plus generated tokens per minute (sync traffic)."),
    click.option("--max-concurrent", type=int, help="Open requests and streams at once."),
    click.option("--max-queued-items", type=int, help="Pending batch items across the key's jobs."),
    click.option("--token-budget", type=int, help="Tokens per --budget-period."),
    click.option("--budget-period", help="1d, 7d, 30d (or any number of s, m, h, d); default 1d."),
    click.option("--models", help="Models the key may use: comma-separated names or globs (llama3*,qwen3:8b)."),
)


def limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(LIMIT_OPTIONS):
        command = option(command)
    return command


def _limits(given: dict[str, Any]) -> Any:
    """The options given, as :class:`KeyLimits` (only those set, so an update keeps the others)."""
    from jobs.keys import KeyLimits

    values = {k: v for k, v in given.items() if v is not None}
    if isinstance(values.get("models"), str):
        values["models"] = [m.strip() for m in values["models"].split(",") if m.strip()]
    try:
        return KeyLimits(**values)
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise click.ClickException(problems) from exc


def _shown(limits: dict[str, Any]) -> str:
    return " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in limits.items()) or "-"


@click.group()
def keys() -> None:
    """API keys (checked when CORRAL_REQUIRE_API_KEY=1), their limits and their usage."""


@keys.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="The key sees every job, batch and file, not only its own.")
@limit_options
@pass_ctx
def keys_create(ctx: Context, /, name: str, admin: bool, **limits: Any) -> None:
    """Create a key and print it (shown once: only its hash is stored)."""
    try:
        key, row = _key_store(ctx).create(name, admin=admin, limits=_limits(limits))
    except CorralError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(key)
    click.echo(f"created {'admin ' if admin else ''}key {row['id']} ({name}); store it now, it is not shown again",
               err=True)


@keys.command("update")
@click.argument("key_id_or_name")
@limit_options
@pass_ctx
def keys_update(ctx: Context, /, key_id_or_name: str, **limits: Any) -> None:
    """Change a key's limits (those given; the others stay)."""
    try:
        row = _key_store(ctx).update(key_id_or_name, _limits(limits))
    except CorralError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"updated {row['id']} ({row['name']}): {_shown(row['limits'])}")


@keys.command("list")
@pass_ctx
def keys_list(ctx: Context) -> None:
    """List keys (id, name, prefix, admin, limits, created, revoked)."""
    rows = _key_store(ctx).list()
    header = ["ID", "NAME", "PREFIX", "ADMIN", "LIMITS", "CREATED", "REVOKED"]
    click.echo(columns([header] + [
        [r["id"], r["name"], r["prefix"] + "...", "yes" if r["admin"] else "", _shown(r["limits"]),
         (r["created_at"] or "")[:19], (r["revoked_at"] or "")[:19]] for r in rows
    ]))


@keys.command("revoke")
@click.argument("key_id_or_name")
@pass_ctx
def keys_revoke(ctx: Context, key_id_or_name: str) -> None:
    """Revoke a key by id or name (takes effect within seconds)."""
    try:
        row = _key_store(ctx).revoke(key_id_or_name)
    except CorralError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"revoked {row['id']} ({row['name']})")


@keys.command("usage")
@click.argument("key_id_or_name", required=False)
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), help="First day (UTC), YYYY-MM-DD.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@pass_ctx
def keys_usage(ctx: Context, key_id_or_name: str | None, since: Any, as_json: bool) -> None:
    """Requests, tokens, embedding inputs and batch items per key and day."""
    store = _key_store(ctx)
    key_id = None
    if key_id_or_name:
        matches = [r for r in store.list() if key_id_or_name in (r["id"], r["name"])]
        if not matches:
            raise click.ClickException(f"no key with id or name '{key_id_or_name}'")
        key_id = matches[0]["id"]
    rows = store.usage(key_id, since.date() if since else None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ["KEY", "DAY", "REQUESTS", "PROMPT", "GENERATED", "EMBED INPUTS", "BATCH ITEMS", "BATCH TOKENS"]
    click.echo(columns([header] + [
        [r["key"], r["day"], r["requests"], r["prompt_tokens"], r["generated_tokens"], r["embed_inputs"],
         r["batch_items"], r["batch_prompt_tokens"] + r["batch_generated_tokens"]] for r in rows
    ]))


