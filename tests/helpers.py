"""Test helpers: settings and Redis databases for a test stack, the HTTP and CLI calls many tests make, a corpus,
a model registry and a template.  The real processes (a Redis, a worker, an API server, each a subprocess as in
production) are the harness's (:mod:`harness.processes`, :mod:`harness.stack`), which the benches share.
Fixtures live in conftest.py and use these; test modules import from here and from the harness, never from
conftest or from each other."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from cli.main import main
from corral.modelstore.store import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MODEL_MEDIA_TYPE
from corral.redis_connection import redis_client
from corral.settings import Settings
from harness.cluster import missing
from harness.netns import can_make_namespaces
from harness.processes import free_port
from harness.redis_sentinel import Node, SentinelCluster
from harness.stack import Stack, fresh_database, wait_for
from jobs.db import sessions
from jobs.models import Chunk, ChunkState, Item, ItemState

ROOT = Path(__file__).resolve().parent.parent


def child_processes(parent: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is ``parent`` (Linux /proc; elsewhere none)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(stat.parent.name), cmdline.strip()))
        except (OSError, IndexError, ValueError):
            continue
    return found


def with_db(url: str, db: int) -> str:
    """The same Redis server, another database number: a separate universe for destructive tests."""
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    return f"{base}/{db}"


def clean_redis(url: str) -> None:
    with redis_client(url) as client:
        keys = list(client.scan_iter(match="corral*")) + list(client.scan_iter(match="_kombu*"))
        if keys:
            client.delete(*keys)


# -- settings and databases ------------------------------------------------------------------------------------

MODEL = "smollm2"
EMBED_MODEL = "all-minilm"
HAVE_PGSERVER = importlib.util.find_spec("pgserver") is not None


def make_settings(home: Path, redis_url: str | None, models_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "home": home,
        "redis_url": redis_url,
        "models_dir": models_dir,
        "host": f"127.0.0.1:{free_port()}",
        "database_url": os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{home / 'corral.db'}",
        "heartbeat_ttl": 3.0,
        "queue_timeout": 120.0,
        "reconcile_interval": 2.0,
        "chunk_size": 4,
        # One llama.cpp thread per worker: two threads spin at each step's barrier, and on a busy machine (another
        # build beside the suite) a descheduled peer made a step ~5x slower and a 400-token test stream time
        # out; one thread is ~10% slower on an idle machine and never stalls.
        "worker_threads": 1,
        # Tests pull only from registries they serve themselves (a fuzzed name must not reach the internet).
        "pull_hosts": ["127.0.0.1:*", "localhost:*"],
        # Their webhook receivers listen on loopback, which production refuses (corral/outbound.py).
        "webhook_allow_networks": ["127.0.0.0/8"],
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def own_stack(settings: Settings, home: Path, redis_db: int, **overrides: object) -> Iterator[Stack]:
    """A worker and an API server of their own: another Redis database and SQLite file, settings overridden."""
    url = with_db(settings.redis, redis_db)
    clean_redis(url)
    models = Path(str(overrides.pop("models_dir", settings.models_path)))
    own = make_settings(home, url, models, **{"database_url": f"sqlite:///{home / 'own.db'}", **overrides})
    fresh_database(own)
    try:
        with Stack(own, home / "logs").running() as stack:
            yield stack
    finally:
        clean_redis(url)


# -- jobs over HTTP --------------------------------------------------------------------------------------------

def submit(base_url: str, **body: Any) -> dict:
    r = httpx.post(base_url + "/api/jobs", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def wait_done(base_url: str, job_id: str, timeout: float = 180) -> dict:
    state: dict = {}

    def ended() -> bool:
        state.update(httpx.get(f"{base_url}/api/jobs/{job_id}").json())
        return state["status"] in ("completed", "failed", "cancelled", "expired")

    wait_for(ended, timeout, f"job {job_id} to end", interval=0.1)
    return state


def results(base_url: str, job_id: str, **params: Any) -> list[dict]:
    r = httpx.get(f"{base_url}/api/jobs/{job_id}/results", params=params, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in r.text.splitlines()]


def worker_counts(base_url: str) -> tuple[int, int]:
    """(prompt tokens decoded, tokens generated) by the live workers so far, from their heartbeats."""
    workers = httpx.get(base_url + "/api/queue", timeout=30).json()["workers"]
    return (sum(w.get("prompt_tokens_decoded", 0) for w in workers), sum(w.get("tokens_generated", 0) for w in workers))


def settled_counts(base_url: str) -> tuple[int, int]:
    """:func:`worker_counts` once heartbeats sent after now have carried them (two equal reads 0.7 s apart, the
    first at least 1.5 s from now: test workers beat every 0.6 s)."""
    start, values = time.time(), []

    def stable() -> bool:
        values.append(worker_counts(base_url))
        return time.time() > start + 1.5 and len(values) > 2 and values[-1] == values[-2]

    wait_for(stable, 30, "a heartbeat with the latest counts", interval=0.7)
    return values[-1]


def job_count(base_url: str) -> int:
    return len(httpx.get(base_url + "/api/jobs", params={"limit": 1000}).json()["jobs"])


# -- the CLI in-process ---------------------------------------------------------------------------------------

def cli(base_url: str, *args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(main, [*args, "--host", base_url], input=input, catch_exceptions=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output and "Traceback" not in result.stderr


# -- a small corpus -------------------------------------------------------------------------------------------

ROCKETS = ("Rockets carry satellites to orbit. The launch vehicle burns liquid oxygen and kerosene, and its first "
           "stage lands back on a barge so it can fly again. ")
GARDEN = "Tomatoes need full sun, rich soil and steady watering; prune the suckers and stake the vines. "


def make_corpus(root: Path) -> Path:
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "rockets.md").write_text("# Rockets\n\n" + ROCKETS * 8)
    (docs / "garden.txt").write_text(GARDEN * 3)
    (docs / "sub" / "page.html").write_text(
        "<html><script>alert(1)</script><p>Sourdough bread needs a lively starter.</p></html>"
    )
    (docs / "sub" / "notes.jsonl").write_text(
        json.dumps({"text": "Jupiter is the largest planet."}) + "\n" + json.dumps({"content": "Cats sleep a lot."}) + "\n"
    )
    (docs / "ignored.bin").write_bytes(b"\x00\x01")
    return docs


# -- a model registry on 127.0.0.1 ----------------------------------------------------------------------------

class Registry:
    """Serves ``/v2/<namespace>/<model>/manifests/<tag>`` and ``.../blobs/<digest>``; can cut a blob short once."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}  # digest -> bytes sent before the connection drops (once)
        self.ranges: list[str] = []
        self.proxied: list[str] = []  # absolute URLs asked of it as a proxy
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("http://"):  # asked as an HTTP proxy is: the absolute URL
                    registry.proxied.append(self.path)
                    self.path = "/" + self.path.split("/", 3)[3]
                parts = self.path.split("/")
                if len(parts) == 6 and parts[4] == "manifests":
                    body = registry.manifests.get("/".join(parts[2:4]) + ":" + parts[5])
                    return self._send(200, body) if body else self._send(404, b'{"errors":[]}')
                if len(parts) == 6 and parts[4] == "blobs" and parts[5] in registry.blobs:
                    data, start = registry.blobs[parts[5]], 0
                    if "Range" in self.headers:
                        registry.ranges.append(self.headers["Range"])
                        start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206 if start else 200)
                    self.send_header("Content-Length", str(len(data) - start))
                    if start:
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.end_headers()
                    cut = registry.cut_after.pop(parts[5], None)
                    self.wfile.write(data[start:cut] if cut else data[start:])
                    if cut:
                        self.close_connection = True
                    return None
                return self._send(404, b"{}")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_port}"

    def publish(self, name: str, model: bytes, **layers: bytes) -> dict[str, Any]:
        """Serve ``name`` (namespace/model:tag) with a model layer and text layers (system=..., params=...)."""
        def ref(media: str, data: bytes) -> dict[str, Any]:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            self.blobs[digest] = data
            return {"mediaType": media, "digest": digest, "size": len(data)}

        manifest = {
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": ref(CONFIG_MEDIA_TYPE, json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()),
            "layers": [ref(MODEL_MEDIA_TYPE, model)]
            + [ref(f"application/vnd.ollama.image.{kind}", data) for kind, data in layers.items()],
        }
        self.manifests[name] = json.dumps(manifest).encode()
        return manifest


# -- tools -----------------------------------------------------------------------------------------------------

# The tool the tool-call tests offer, the JSON Schema of one call of it (a `format` that forces the call), and
# the question that asks for it.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_SHAPE = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                      "required": ["city"]},
    },
    "required": ["name", "arguments"],
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def chat_chunk(content: str = "", thinking: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One not-final chunk of a native chat stream, as the gateway hands it to a wire format's reply."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = calls
    return {"model": "m", "message": message, "done": False}


# -- templates -------------------------------------------------------------------------------------------------

# The template of Ollama's library ChatML models, as `ollama show --template` prints it.
CHATML_TEMPLATE = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""


# -- fault tests: a job through a fault, then the audit ---------------------------------------------------------
# Shared by the multi-host tests (harness/cluster.py) and those on loopback: the same job, the same audit.

AUDIT_AFTER = 48  # the audit's new job: six chunks of eight, enough for two workers
# A generation that runs for tens of seconds (2000 tokens: about 25 s here), and the line a worker logs when it
# stops one because its reader is gone (a cancel, or a lapsed lease: corral/protocol.py).
LONG_GENERATE = {"model": MODEL, "prompt": "Write a very long story about a dragon.", "options": {"num_predict": 2000}}
CANCELLED_BY_CLIENT = re.compile(r"request (\w+) cancelled by its client after (\d+) tokens")


def require_namespaces() -> None:
    """Skip the calling test, with the reason, where a multi-host cluster cannot be made (not root, no iproute2,
    no Redis or PostgreSQL); CI sets ``CORRAL_NETNS_REQUIRED=1`` (.ci/run), and there it fails instead."""
    ok, why = can_make_namespaces()
    if ok and missing() is not None:
        ok, why = False, str(missing())
    if not ok:
        if os.environ.get("CORRAL_NETNS_REQUIRED") == "1":  # .ci/run: the fault tests must run there
            pytest.fail(f"CORRAL_NETNS_REQUIRED=1 but the multi-host tests cannot run: {why}")
        pytest.skip(f"the multi-host tests need network namespaces, Redis and PostgreSQL: {why}")


def submit_job(base_url: str, count: int, tag: str, num_predict: int = 6) -> str:
    """A generate job of ``count`` items (``<tag>-<i>``), short answers; its id."""
    body = [{"custom_id": f"{tag}-{i}", "prompt": f"Count to {i}."} for i in range(count)]
    return str(submit(base_url, kind="generate", items=body, options={"num_predict": num_predict, "temperature": 0})["id"])


def chunks_of(settings: Settings, job_id: str) -> list[Chunk]:
    with sessions(settings)() as session:
        return list(session.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.seq)))


def item_states(settings: Settings, job_id: str) -> dict[str, int]:
    """The job's items per stored state, from SQL (the truth)."""
    with sessions(settings)() as session:
        rows = session.execute(select(Item.state, func.count()).where(Item.job_id == job_id).group_by(Item.state))
        return {state: n for state, n in rows}


def listed_workers(base_url: str) -> set[str]:
    """The workers the API lists as live (``/api/queue``, the console's queue page)."""
    r = httpx.get(base_url + "/api/queue", timeout=30)
    assert r.status_code == 200, r.text
    return {str(w["name"]) for w in r.json()["workers"]}


def audit(base_url: str, settings: Settings, job_id: str, count: int, tag: str, after: int = AUDIT_AFTER) -> Counter[str]:
    """The job (``count`` items of :func:`submit_job`) completed with exactly one result per item, none failed,
    nothing left running anywhere, and a new job of ``after`` items runs to its end; the new job's chunks per
    worker."""
    job = wait_done(base_url, job_id, timeout=240)
    assert job["status"] == "completed", job
    assert job["counts"] == {"total": count, "pending": 0, "running": 0, "succeeded": count, "failed": 0,
                             "cancelled": 0}, job
    lines = results(base_url, job_id)
    assert [line["custom_id"] for line in lines] == [f"{tag}-{i}" for i in range(count)]  # each once, in order
    assert all(line["state"] == "succeeded" and line["response"]["eval_count"] > 0 for line in lines)
    with sessions(settings)() as session:
        open_chunks = session.scalars(select(Chunk.id).where(Chunk.state != ChunkState.DONE)).all()
        open_items = session.scalars(select(Item.id).where(Item.state.in_((ItemState.PENDING, ItemState.RUNNING)))).all()
        unsettled = session.scalars(select(Item.id).where(Item.job_id == job_id, Item.claim.is_not(None))).all()
        reruns = session.scalar(select(func.count()).select_from(Item).where(Item.job_id == job_id, Item.attempts > 1))
    assert (list(open_chunks), list(open_items), list(unsettled)) == ([], [], [])
    new = submit_job(base_url, after, "after")
    started = time.monotonic()
    done = wait_done(base_url, new, timeout=120)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == after, done
    assert [line["custom_id"] for line in results(base_url, new)] == [f"after-{i}" for i in range(after)]
    print(f"audit: {reruns} item(s) ran more than once (one result each); a new job of {after} items ran in "
          f"{time.monotonic() - started:.1f} s")
    return Counter(str(chunk.worker) for chunk in chunks_of(settings, new))


# -- a Redis failover (harness/redis_sentinel.py) mid-job ---------------------------------------------------------

FAILOVER_CHAT_BOUND = 20.0  # an interactive request during the failover has its answer (an error, or a reply) within this
# Seconds from the kill until a chat succeeds.  Measured on two cores, across hosts (test_multihost_faults.py): the
# promotion 1.7-3.3 s after the kill (down-after 1 s, then the Sentinels' vote), a chat 3.2-5.8 s after the kill
# (1.4-3.5 s after the promotion: a worker's consumer reconnects within 2 s, then starts its consumers again), the
# job on at the promotion.
FAILOVER_RECOVERY_BOUND = 20.0
SHORT_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "options": {"num_predict": 4}}
# A reply that runs for seconds: counting keeps a small model from ending early.
LONG_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
             "options": {"num_predict": 1000, "temperature": 0}}


def chat(base_url: str, stream: bool, body: dict | None = None,
         first_line: threading.Event | None = None) -> tuple[int, str, str | None, float]:
    """(status, body, Retry-After, seconds) of one chat; ``first_line`` is set once the reply's first line came."""
    started = time.monotonic()
    with httpx.stream("POST", base_url + "/api/chat", json={**(body or SHORT_CHAT), "stream": stream},
                      timeout=FAILOVER_CHAT_BOUND + 5) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if first_line is not None:
                first_line.set()
    return r.status_code, "\n".join(lines), r.headers.get("retry-after"), time.monotonic() - started


def clear_answer(status: int, text: str, retry_after: str | None, stream: bool) -> str:
    """What a chat that met the failover got: 'error' (a 503 with Retry-After, or a stream ending in an error
    line) or 'reply' (it ran after the promotion); anything else fails the test."""
    if status == 503:
        assert retry_after is not None, text
        return "error"
    assert status == 200, (status, text)
    last = json.loads(text.splitlines()[-1])
    if "error" in last:
        assert stream, text
        return "error"
    assert last.get("done") is True, text
    return "reply"


def lost_markers(cluster: SentinelCluster) -> set[str]:
    """The chunks whose markers the primary holds and the replica does not: a failover now loses them (with the
    chunk messages sent before them)."""
    with cluster.primary().client() as primary, cluster.replica().client() as replica:
        keys = set(primary.scan_iter(match="corral:chunk:*")) - set(replica.scan_iter(match="corral:chunk:*"))
    return {key.decode().rsplit(":", 1)[1] for key in keys}


def still_queued(settings: Settings, chunk_ids: set[str]) -> set[str]:
    """Those of ``chunk_ids`` SQL has queued (no worker claimed them): only the reconciler can send them again."""
    with sessions(settings)() as session:
        return set(session.scalars(select(Chunk.id).where(Chunk.id.in_(chunk_ids), Chunk.state == "queued")))


@dataclass
class Failover:
    """What :func:`fail_over` measured (seconds from the kill) and saw."""

    new: Node  # the promoted server
    promoted_in: float
    answered_in: float  # a chat succeeded
    resumed_in: float  # the job had a new result
    during: list[tuple[bool, str, int, float]]  # chats sent during it: (streamed, 'error' or 'reply', status, seconds)
    in_flight: tuple[int, float, int]  # the stream under way at the kill: status, seconds, lines
    lost: set[str]  # chunk markers the primary took with it
    stranded: set[str]  # those whose chunks were still queued in SQL at the kill: the reconciler must resend them

    def summary(self) -> str:
        status, took, lines = self.in_flight
        return (f"promoted {self.new.name} {self.promoted_in:.1f} s after the kill; a chat succeeded "
                f"{self.answered_in:.1f} s after the kill ({self.answered_in - self.promoted_in:.1f} s after the "
                f"promotion), the job ran on {self.resumed_in:.1f} s after it; during it: {self.during}, in-flight "
                f"stream {status} in {took:.1f} s ({lines} lines); {len(self.lost)} chunk marker(s) lost with the "
                f"primary, {len(self.stranded)} of them queued")


def fail_over(base_url: str, cluster: SentinelCluster, settings: Settings, job_id: str, *, stall: float = 0.0,
              warm: int = 30) -> Failover:
    """Kill the Redis primary once ``warm`` of the job's items are done, with a streamed chat under way, and see
    the failover through (the job's audit is the caller's).

    ``stall``: the replica lags that many seconds first (:meth:`SentinelCluster.stall_replication`), so that
    the failover really loses the last writes.  Asserted: the kill lands mid-job; the stream under way ends in
    an error line, and chats sent during the failover get a clear answer (a 503 with ``Retry-After``, an error
    line, or a reply), each within :data:`FAILOVER_CHAT_BOUND`, never a hang; a replica is promoted; a chat
    succeeds within :data:`FAILOVER_RECOVERY_BOUND` of the kill and the job runs on.  Then the old primary is
    started again as a replica of the new one (the deployment heals) and refuses writes."""
    total = sum(item_states(settings, job_id).values())
    wait_for(lambda: item_states(settings, job_id).get("succeeded", 0) >= warm, 120, "the job to make progress")
    in_flight: list[tuple[int, str, str | None, float]] = []
    under_way = threading.Event()
    streaming = threading.Thread(target=lambda: in_flight.append(chat(base_url, True, LONG_CHAT, under_way)))
    streaming.start()
    assert under_way.wait(30), "the streamed chat did not start"

    if stall:
        cluster.stall_replication()
        time.sleep(stall)
    lost = lost_markers(cluster)
    old = cluster.kill_primary()
    killed_at = time.monotonic()
    promotion: list[tuple[Node, float]] = []  # (the new primary, seconds from the kill), watched from now on
    watcher = threading.Thread(target=lambda: promotion.append(cluster.wait_promoted(old, timeout=60)))
    watcher.start()
    stranded = still_queued(settings, lost)
    done_at_kill = item_states(settings, job_id).get("succeeded", 0)
    assert done_at_kill < total * 0.7, "the kill must land mid-job"

    during = []
    for stream in (False, True):
        status, text, retry_after, took = chat(base_url, stream)
        assert took < FAILOVER_CHAT_BOUND, (stream, took, status, text)
        during.append((stream, clear_answer(status, text, retry_after, stream), status, round(took, 2)))
    streaming.join(FAILOVER_CHAT_BOUND + 10)
    assert not streaming.is_alive() and in_flight, "the streamed chat under way hung"
    status, text, retry_after, took = in_flight[0]
    assert status == 200 and clear_answer(status, text, retry_after, True) == "error", text[-500:]

    watcher.join(65)
    assert promotion, "no replica was promoted"
    new, promoted_in = promotion[0]
    answered: list[float] = []
    resumed: list[float] = []

    def back() -> bool:
        if not resumed and item_states(settings, job_id).get("succeeded", 0) > done_at_kill:
            resumed.append(time.monotonic() - killed_at)
        if not answered and chat(base_url, False)[0] == 200:
            answered.append(time.monotonic() - killed_at)
        return bool(answered and resumed)

    wait_for(back, 60, "a chat to succeed and the job to run on after the promotion", interval=0.2)
    report = Failover(new, promoted_in, answered[0], resumed[0], during, (status, took, len(text.splitlines())),
                      lost, stranded)
    print(f"\nfailover: {report.summary()}")
    assert report.answered_in < FAILOVER_RECOVERY_BOUND, report.summary()

    cluster.restart_as_replica(old)
    with new.client() as client:
        assert client.info("replication")["connected_slaves"] == 1  # the old primary follows the new one
    with pytest.raises((redis.RedisError, OSError)):
        with old.client(0.5) as client:
            client.set("corral:probe", b"1")  # it is a replica again: it refuses writes
    return report
