"""The operator console: ``/ui``, server-rendered pages for jobs, queues, workers, models and keys.

Pages are Jinja templates over the JSON API's own services (:mod:`api.console.pages`); the only script
(``static/console/console.js``) refreshes the live parts every 2 seconds, streams pull and create progress,
and asks before a delete.  Everything the page loads ships in this package: no CDN, it works offline.

Sign-in and CSRF are :mod:`api.console.sessions`.  With ``CORRAL_REQUIRE_API_KEY=1`` a page asks for a key once;
a non-admin key sees its own jobs only, as through the API.  Responses carry a Content-Security-Policy that
allows this origin's script and styles only, so even a value that escaped escaping could not run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    send_file,
    stream_with_context,
    url_for,
)
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from api.auth import principal, refuse_if_read_only, require_admin
from api.console import pages
from api.console.sessions import ConsoleSessions, check_csrf
from api.errors import dumps, ollama_error
from api.services import services
from api.streaming import NDJSON_MIMETYPE, ndjson, prime
from api.vector_stores import search_page
from corral.errors import BadRequest, CorralError, Forbidden
from corral.modelstore.modelfile import create_body, parse_modelfile
from corral.wire.openai import parse_request
from corral.wire.vector_stores import SearchRequest
from jobs.export import csv_pieces, write_parquet
from jobs.keys import KeyLimits
from jobs.models import JobStatus

bp = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")
OPEN_ENDPOINTS = {"console.login", "console.static"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def init_app(app: Flask) -> None:
    app.extensions["corral_console"] = ConsoleSessions(services(app).gateway.broker)
    app.register_blueprint(bp)
    app.jinja_env.filters.update(duration=_duration, size=_size, percent=_percent)


def _sessions() -> ConsoleSessions:
    found: ConsoleSessions = current_app.extensions["corral_console"]
    return found


@bp.before_request
def _sign_in_and_csrf() -> BaseResponse | None:
    """Who is looking (the session's key, when keys are required), and the CSRF check on every POST."""
    if request.endpoint == "console.static":
        return None
    session = g.console = _sessions().current()
    if services().settings.require_api_key:
        keys = services().governor.keys
        g.principal = keys.check_hash(session.key_hash) if session.key_hash else None
        if g.principal is None and session.stored:  # its key was revoked: the session ends with it
            session = g.console = _sessions().end(session)
        if g.principal is None and request.endpoint not in OPEN_ENDPOINTS:
            if request.method != "GET":
                raise Forbidden("sign in first")
            return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
    if request.method == "POST":
        check_csrf(session)
    return None


@bp.after_request
def _keep_session(response: BaseResponse) -> BaseResponse:
    session = g.get("console")
    if session is not None and not g.get("signed_out"):
        _sessions().save(session, response)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(CorralError)
def _error(exc: CorralError) -> Response | tuple[str, int]:
    if request.accept_mimetypes.best == NDJSON_MIMETYPE:  # the pull and create forms' fetch
        return ollama_error(exc.message, exc.status_code)
    return render_template("console/error.html", status=exc.status_code, message=exc.message), exc.status_code


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    return render_template("console/error.html", status=status, message=exc.description or exc.name), status


def _page(template: str, fragment: str | None = None, **context: Any) -> str:
    """The whole page, or with ``?fragment=1`` only its live part (what console.js swaps in every 2 s)."""
    who = principal()
    context.update(who=who, keys_on=services().settings.require_api_key, csrf=g.console.csrf,
                   is_admin=who is None or who.admin)
    if fragment and request.args.get("fragment"):
        return render_template(fragment, **context)
    return render_template(template, **context)


# -- sign-in ---------------------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | str:
    error = None
    target = request.values.get("next") or url_for("console.jobs")
    if not target.startswith("/ui"):  # never an open redirect
        target = url_for("console.jobs")
    if request.method == "POST":
        from jobs.keys import hash_key

        digest = hash_key(request.form.get("key", "").strip())
        if services().governor.keys.check_hash(digest) is not None:
            g.console = _sessions().sign_in(g.console, digest)
            return redirect(target)
        error = "That key is not valid (unknown or revoked)."
    return _page("console/login.html", error=error, target=target)


@bp.post("/logout")
def logout() -> BaseResponse:
    response = redirect(url_for("console.login"))
    _sessions().sign_out(g.console, response)
    g.signed_out = True
    return response


# -- jobs ------------------------------------------------------------------------------------------------


@bp.get("/")
def index() -> BaseResponse:
    return redirect(url_for("console.jobs"))


@bp.get("/jobs")
def jobs() -> str:
    status = request.args.get("status") or None
    if status is not None and status not in JobStatus.ALL:
        raise BadRequest(f"status must be one of {', '.join(JobStatus.ALL)}")
    page = _positive(request.args.get("page"), 1)
    data = pages.jobs_page(services(), principal(), status, page)
    return _page("console/jobs.html", "console/_jobs_table.html", statuses=JobStatus.ALL, **data)


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    data = pages.job_page(services(), principal(), job_id)
    query = request.args.get("q", "").strip()
    search = None
    if query and data["job"]["kind"] == "embed":
        search = services().search_job(job_id, query, 10, pages.owner_of(principal()))
    return _page("console/job.html", "console/_job_live.html", query=query, search=search, **data)


@bp.post("/jobs/<job_id>/<action>")
def job_action(job_id: str, action: str) -> BaseResponse:
    owner = pages.owner_of(principal())
    if action == "cancel":
        services().jobs.cancel(job_id, owner)
    elif action == "retry":
        services().jobs.retry(job_id, owner)
    elif action == "delete":
        services().jobs.delete(job_id, owner)
        return redirect(url_for("console.jobs", notice=f"Job {job_id} deleted."))
    else:
        raise BadRequest(f"unknown action {action!r}: cancel, retry or delete")
    return redirect(url_for("console.job", job_id=job_id))


@bp.get("/jobs/<job_id>/results.<fmt>")
def download(job_id: str, fmt: str) -> Response:
    owner = pages.owner_of(principal())
    view = services().jobs.get(job_id, owner)
    if fmt not in pages.export_formats(view["kind"]):
        raise BadRequest(f"results come as {', '.join(pages.export_formats(view['kind']))}, not {fmt}")
    lines = services().jobs.results(job_id, owner=owner, include_input=view["kind"] == "embed")
    name = f"{job_id}.{fmt}"
    if fmt == "jsonl":
        body: Iterator[str] = (dumps(line) + "\n" for line in lines)
        return _attachment(Response(stream_with_context(body), mimetype=NDJSON_MIMETYPE), name)
    encoded = (dumps(line).encode() for line in lines)
    if fmt == "csv":
        return _attachment(Response(stream_with_context(csv_pieces(encoded, view["kind"])), mimetype="text/csv"), name)
    scratch = tempfile.NamedTemporaryFile(suffix=".parquet", delete=False)  # Parquet's footer needs the whole file
    scratch.close()
    try:
        write_parquet(encoded, view["kind"], scratch.name)
        data = open(scratch.name, "rb")
    finally:
        os.unlink(scratch.name)  # the open handle keeps the data until the response is sent
    return send_file(data, mimetype="application/vnd.apache.parquet", as_attachment=True, download_name=name)


def _attachment(response: Response, name: str) -> Response:
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


# -- collections -----------------------------------------------------------------------------------------------


@bp.get("/collections")
def collections() -> str:
    return _page("console/collections.html", **pages.collections_page(services(), principal()))


@bp.get("/collections/<store_id>")
def collection(store_id: str) -> str:
    status = request.args.get("status") or None
    if status is not None and status not in ("in_progress", "completed", "failed", "cancelled"):
        raise BadRequest("status must be in_progress, completed, failed or cancelled")
    data = pages.collection_page(services(), principal(), store_id, status)
    query = request.args.get("q", "").strip()
    mode = request.args.get("mode") or "hybrid"
    ranker = request.args.get("rerank") or "none"
    search = None
    if query:
        if mode not in pages.SEARCH_MODES:
            raise BadRequest(f"mode must be one of {', '.join(pages.SEARCH_MODES)}")
        weights = pages.SEARCH_MODES[mode]
        body = parse_request(SearchRequest, {"query": query, "max_num_results": 10, "ranking_options": {
            "ranker": ranker, "hybrid_search": {"embedding_weight": weights[0], "text_weight": weights[1]}}})
        search = search_page(store_id, pages.owner_of(principal()), body)
    return _page("console/collection.html", "console/_collection_live.html", query=query, mode=mode,
                 ranker=ranker, search=search, **data)


# -- queue, workers, models ------------------------------------------------------------------------------------


@bp.get("/queue")
def queue() -> str:
    return _page("console/queue.html", "console/_queue_live.html", **pages.queue_page(services(), principal()))


@bp.get("/models")
def models() -> str:
    return _page("console/models.html", "console/_models_table.html", **pages.models_page(services(), principal()))


@bp.post("/models/pull")
def pull() -> Response:
    refuse_if_read_only("pulling a model")
    require_admin("pulling a model")
    name = request.form.get("name", "").strip()
    if not name:
        raise BadRequest("name the model to pull, e.g. smollm2:135m or hf.co/owner/repo")
    steps = services().models.pull(name, insecure=bool(request.form.get("insecure")))
    return ndjson(prime(steps), steps)


@bp.post("/models/create")
def create() -> Response:
    refuse_if_read_only("creating a model")
    require_admin("creating a model")
    name = request.form.get("name", "").strip()
    if not name:
        raise BadRequest("name the new model")
    body = create_body(parse_modelfile(request.form.get("modelfile", "")))
    if body.get("adapters") or str(body["from"]).startswith(("/", ".", "~")):
        raise BadRequest("the console creates models from models it has; for files use `corral create -f Modelfile`")
    steps = services().models.create(
        name, base=body["from"], system=body.get("system"), parameters=body.get("parameters"),
        messages=body.get("messages"), license=body.get("license"), template=body.get("template"),
        quantize=request.form.get("quantize") or None,
    )
    return ndjson(prime(steps), steps)


# -- keys (admin) ----------------------------------------------------------------------------------------------


@bp.route("/keys", methods=["GET", "POST"])
def keys() -> str:
    require_admin("managing keys")
    store = services().governor.keys
    created = None
    if request.method == "POST":
        name = request.form.get("name", "").strip()
        if not name:
            raise BadRequest("a key needs a name")
        created, _ = store.create(name, admin=bool(request.form.get("admin")), limits=KeyLimits())
    return _page("console/keys.html", keys=store.list(), created=created)


@bp.post("/keys/<key_id>/revoke")
def revoke(key_id: str) -> BaseResponse:
    require_admin("managing keys")
    services().governor.keys.revoke(key_id)
    return redirect(url_for("console.keys"))


# -- helpers ---------------------------------------------------------------------------------------------------


def _positive(text: str | None, default: int) -> int:
    try:
        return max(1, int(text or default))
    except ValueError as exc:
        raise BadRequest("page must be a number") from exc


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _size(size: int | None) -> str:
    value = float(size or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _percent(fraction: float | None) -> str:
    return f"{(fraction or 0) * 100:.0f}%"

