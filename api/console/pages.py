"""What each console page shows, gathered from the same services the JSON API uses (so a key sees in the
console exactly what it sees through the API) and shaped for the templates.

Nothing here renders HTML: the templates do, with Jinja's autoescaping on, so custom ids, errors and model
output reach the page as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.services import Services
from jobs.keys import Principal

PAGE_SIZE = 25
PREVIEW_ITEMS = 10
FAILED_ITEMS = 20
CHART_WIDTH, CHART_HEIGHT = 600, 140


def owner_of(who: Principal | None) -> str | None:
    """Whose jobs the viewer sees: its own key's (a non-admin key), or everyone's."""
    return None if who is None or who.admin else who.key_id


def key_names(shared: Services, who: Principal | None) -> dict[str, str]:
    """Key id -> name, for the owner column: every key for an admin (or with keys off), else the viewer's own."""
    if who is not None and not who.admin:
        return {who.key_id: who.name}
    return {row["id"]: row["name"] for row in shared.governor.keys.list()}


def jobs_page(shared: Services, who: Principal | None, status: str | None, page: int) -> dict[str, Any]:
    listing = shared.jobs.list(status=status, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE, owner=owner_of(who))
    return {"jobs": listing["jobs"], "has_more": listing["has_more"], "page": page, "status": status,
            "owners": key_names(shared, who)}


@dataclass
class Chart:
    """A throughput line as SVG coordinates (the template draws it; no chart library, no script)."""

    points: str
    area: str
    peak: float
    span: float
    label: str


def throughput_chart(series: list[tuple[float, float]]) -> Chart | None:
    if not series:
        return None
    peak = max(rate for _, rate in series)
    span = series[-1][0] + (series[1][0] if len(series) > 1 else 1.0)
    scale = (CHART_HEIGHT - 10) / peak if peak else 0.0
    step = CHART_WIDTH / max(len(series) - 1, 1)
    coords = [(round(i * step, 1), round(CHART_HEIGHT - rate * scale, 1)) for i, (_, rate) in enumerate(series)]
    points = " ".join(f"{x},{y}" for x, y in coords)
    area = f"0,{CHART_HEIGHT} {points} {CHART_WIDTH},{CHART_HEIGHT}"
    label = f"Items finished per second over {span:.0f} s; peak {peak:.2f} per second"
    return Chart(points, area, peak, span, label)


def job_page(shared: Services, who: Principal | None, job_id: str) -> dict[str, Any]:
    owner = owner_of(who)
    job = shared.jobs.get(job_id, owner)
    failed = list(shared.jobs.results(job_id, state="failed", limit=FAILED_ITEMS, owner=owner, include_input=True))
    preview = [_preview(line, job["kind"]) for line in shared.jobs.results(job_id, limit=PREVIEW_ITEMS, owner=owner)]
    return {
        "job": job,
        "chart": throughput_chart(shared.jobs.throughput(job_id, owner)),
        "failed": failed,
        "preview": preview,
        "owners": key_names(shared, who),
        "formats": export_formats(job["kind"]),
    }


def export_formats(kind: str) -> list[str]:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return ["jsonl", "csv"]
    return ["jsonl", "csv", "parquet"]


def _preview(line: dict[str, Any], kind: str) -> dict[str, Any]:
    """One result line cut down to what fits a table row: the text (or the vector's size), or the error."""
    response = line.get("response") or {}
    if kind == "embed":
        vectors = response.get("embeddings") or []
        text = f"{len(vectors)} vector(s) of {len(vectors[0])} dimensions" if vectors else ""
    else:
        message = response.get("message") or {}
        text = str(response.get("response", message.get("content")) or "")
    return {"custom_id": line.get("custom_id"), "index": line.get("index"), "state": line.get("state"),
            "text": text[:400], "error": line.get("error")}


def queue_page(shared: Services, who: Principal | None) -> dict[str, Any]:
    """The queue per model and the workers, dead ones too, with only the models the viewer's key may use."""
    return shared.queue(who, shared.gateway.worker_states())


def models_page(shared: Services, who: Principal | None) -> dict[str, Any]:
    loaded: dict[str, list[str]] = {}  # by GGUF digest: a worker loads a file, whichever name asked for it
    for worker in shared.gateway.workers():
        for entry in worker.get("loaded", []):
            loaded.setdefault(str(entry.get("model_digest")), []).append(worker["name"])
    models = []
    for record in shared.store.list():
        name = record.name.display
        if not shared.governor.allowed(who, name):
            continue
        models.append({"name": name, "size": record.size, "details": record.details(),
                       "capabilities": record.capabilities, "loaded_on": sorted(set(loaded.get(record.model_digest, []))),
                       "modified_at": record.modified_at})
    models.sort(key=lambda m: str(m["name"]))
    return {"models": models, "can_change": (who is None or who.admin) and not shared.settings.read_only}


SEARCH_MODES = {"hybrid": (1.0, 1.0), "vector": (1.0, 0.0), "text": (0.0, 1.0)}


def collections_page(shared: Services, who: Principal | None) -> dict[str, Any]:
    """The viewer's collections (another key's are not listed), newest first."""
    listing = shared.collections.list(owner=owner_of(who), limit=100)
    return {"stores": listing["data"], "has_more": listing["has_more"]}


def collection_page(shared: Services, who: Principal | None, store_id: str, status: str | None) -> dict[str, Any]:
    """One collection: its state, the jobs indexing it now, its documents (``status``: only those) and failures,
    and the rerank models its search box offers."""
    owner = owner_of(who)
    store = shared.collections.get(store_id, owner)
    documents = shared.collections.list_files(store_id, owner, limit=PAGE_SIZE * 2, status=status)
    failed = shared.collections.list_files(store_id, owner, limit=FAILED_ITEMS, status="failed")
    rerankers = sorted(r.name.display for r in shared.store.list()
                       if "rerank" in r.capabilities and shared.governor.allowed(who, r.name.display))
    return {"store": store, "documents": documents["data"], "more_documents": documents["has_more"],
            "failed": failed["data"], "jobs": shared.collections.activity(store_id, owner), "rerankers": rerankers,
            "status": status, "modes": list(SEARCH_MODES)}
