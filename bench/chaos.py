"""A chaos soak (issue #38 item 3): mixed work on the multi-host harness while a loop breaks it, then an audit.

Why: the fault tests (tests/integration/test_multihost.py, test_redis_failover.py, test_postgres_restart.py) each
break one thing once, on one job.  A deployment meets many faults, one after another, while chats, jobs and
batches of every kind run.  This bench runs that for N minutes and says whether anything was lost or done twice,
how interactive requests fared, and whether any process's memory or descriptors grew.

How, one module per part:

- the deployment (bench/chaos_cluster.py): :mod:`harness.cluster`'s hosts, each a network namespace (``db``:
  PostgreSQL and Redis as a Sentinel-managed primary and replica; ``api-a``: ``corral serve``; ``gpu-1``:
  ``corral worker``; ``gpu-2``: ``corral worker --pull-from`` the API), and a trigger that logs every result write;
- the load (bench/chaos_load.py): chats on ``/api/chat`` (half streamed, timed), generate jobs, embed jobs and
  OpenAI batches, each kind with at most one or two jobs open;
- the faults (bench/chaos_faults.py): one at a time every 20-40 s, seeded, each undone before the next: kill a
  worker, kill a GPU host's processes, lose a host (a power cut), partition a host from ``db`` or isolate it,
  fail Redis over, restart PostgreSQL; ``--faults`` picks a subset;
- the ledger (bench/chaos_ledger.py): what was sent and which fault was active around each failure;
- the process watch (bench/chaos_watch.py): each process's RSS, PSS, anonymous memory and descriptors, sampled
  every 20 s, and PostgreSQL's memory split into private and shared once a minute;
- the audit (bench/chaos_audit.py), after the faults stop, the load stops and every submitted job has ended
  (bounded): per submitted item exactly one row and one result, from SQL.

This module runs them in that order and prints the report: items submitted, succeeded, failed, lost and
duplicated; interactive requests sent, failed (by reason, with the fault around them) and their p50/p95; the
faults; each process at the start (after the warm-up) and the end; PostgreSQL's memory series.

Run (root: network namespaces), without the suite's Redis and database::

    env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python -m bench.chaos --minutes 15 [--seed S] [--faults a,b]

Everything it started (processes, namespaces, the bridge) is removed at the end, pass or fail, Ctrl-C included;
its logs are kept under the printed directory only with ``--keep`` or on a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chaos_audit import Audit, audit
from bench.chaos_cluster import HOSTS, ChaosCluster, base_settings
from bench.chaos_faults import FAULTS, Faults
from bench.chaos_ledger import RECENT, FaultEvent, Interactive, Ledger
from bench.chaos_load import CHAT_TIMEOUT, Load
from bench.chaos_logs import errors, keep_postgres_log, tracebacks
from bench.chaos_watch import SAMPLE_EVERY, Watch
from bench.common import print_table
from harness.cluster import missing
from harness.netns import Network, can_make_namespaces
from harness.stack import wait_for

log = logging.getLogger("bench.chaos")

WARMUP_BOUND = 180.0  # seconds for the first jobs to end before the faults start
DRAIN_BOUND = 420.0  # seconds for every submitted job to end once the faults stop


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank; NaN for none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _spread(values: list[float]) -> tuple[float, float, float]:
    """p50, p95 and max (NaN for none)."""
    return percentile(values, 50), percentile(values, 95), max(values, default=float("nan"))


def loadavg() -> str:
    """The machine's load average, 1/5/15 minutes: it shares its cores, so a reader needs it beside the times."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM as a Ctrl-C, so that a killed soak still removes its namespaces and processes."""
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_drained(load: Load, ledger: Ledger, bound: float) -> float:
    """Seconds until every submitted job has ended (SQL), at most ``bound``; a job still open is a problem."""
    started = time.monotonic()
    ids = [job.job_id for job in ledger.jobs]
    while time.monotonic() - started < bound:
        ids = load.open_jobs(ids)
        if not ids:
            break
        time.sleep(2)
    if ids:
        ledger.problem(f"{len(ids)} job(s) had not ended {bound:g} s after the faults stopped: {ids[:5]}")
    return time.monotonic() - started


def report(args: argparse.Namespace, ledger: Ledger, found: Audit, watch: Watch, facts: dict[str, str],
           logged: Counter[tuple[str, str]]) -> None:
    """The soak's tables, in Markdown, as pasted into bench/README.md."""
    print(f"\n## Chaos soak: {args.minutes:g} minutes, seed {args.seed}\n")
    for key, value in facts.items():
        print(f"- {key}: {value}")

    kinds = ("generate", "embed", "batch")
    counted: list[list[int]] = []
    for kind in kinds:
        c = found.by_kind.get(kind, Counter())
        counted.append([c[k] for k in ("jobs", "submitted", "succeeded", "failed", "lost", "duplicated", "re-run")])
    rows: list[list[Any]] = [[kind, *c] for kind, c in zip(kinds, counted)]
    rows.append(["**all**", *(sum(column) for column in zip(*counted))])
    print_table("Items (audited from SQL; re-run: attempts > 1, one result still)",
                ["kind", "jobs", "submitted", "succeeded", "failed", "lost", "duplicated", "re-run"], rows)
    if found.failed_errors:
        print_table("Failed items by error", ["kind", "error", "items"],
                    [[k, e.replace("|", "/"), n] for (k, e), n in found.failed_errors.most_common()])
    if ledger.refused:
        print_table("Submissions refused (no job made), by the fault around them", ["kind: reason", "fault", "count"],
                    [[k.replace("|", "/"), f, n] for (k, f), n in ledger.refused.most_common()])

    rows = []
    for label, pick in (("chat", lambda c: not c.stream), ("chat, streamed", lambda c: c.stream),
                        ("all", lambda c: True)):
        chats = [c for c in ledger.chats if pick(c)]
        ok = [c.seconds * 1000 for c in chats if c.outcome == "ok"]
        every = [c.seconds * 1000 for c in chats]
        rows.append([label, len(chats), len(chats) - len(ok), f"{percentile(ok, 50):.0f}", f"{percentile(ok, 95):.0f}",
                     f"{max(ok, default=float('nan')):.0f}", f"{percentile(every, 95):.0f}"])
    print_table("Interactive requests (ms; p50/p95/max of those that succeeded, and p95 of all)",
                ["requests", "sent", "failed", "p50", "p95", "max", "p95, failures included"], rows)
    around: dict[str, list[Interactive]] = defaultdict(list)
    for chat in ledger.chats:
        around[chat.fault.split(" ")[0]].append(chat)
    print_table(f"Interactive requests by the fault around them (active, or undone less than {RECENT:g} s before)",
                ["fault", "sent", "failed", "p50 ms", "p95 ms", "max ms"],
                [[name, len(chats), sum(c.outcome != "ok" for c in chats),
                  *(f"{v:.0f}" for v in _spread([c.seconds * 1000 for c in chats if c.outcome == "ok"]))]
                 for name, chats in sorted(around.items())])
    failures = Counter((c.outcome, c.fault) for c in ledger.chats if c.outcome != "ok")
    if failures:
        print_table("Interactive failures by reason and the fault around them", ["reason", "fault", "count"],
                    [[o.replace("|", "/"), f, n] for (o, f), n in failures.most_common()])

    by_fault: dict[str, list[FaultEvent]] = defaultdict(list)
    for event in ledger.faults:
        by_fault[event.name].append(event)
    print_table("Faults", ["fault", "times", "hosts", "held s (mean)", "last note"],
                [[name, len(events), ", ".join(f"{h} {n}" for h, n in Counter(e.host for e in events).items()),
                  sum(e.hold for e in events) / len(events), events[-1].note.replace("|", "/")]
                 for name, events in sorted(by_fault.items())])
    db_events = [e for e in ledger.faults if e.host == "db"]
    if db_events:
        print_table("Each fault on db (minutes from the first fault)", ["at min", "fault", "held s", "note"],
                    [[f"{(e.started - ledger.faults[0].started) / 60:.1f}", e.name, f"{e.hold:.1f}",
                      e.note.replace("|", "/")] for e in db_events])
    print_table("Processes: RSS, PSS and anonymous memory (Pss_Anon; MiB) and open descriptors, at the start (after"
                " warm-up) and the end",
                ["process", "pid", "RSS start", "RSS end", "RSS peak", "PSS start", "PSS end", "anon start",
                 "anon end", "anon peak", "fds start", "fds end", "fds peak", "procs"],
                watch.rows())
    marks, rows = watch.anon_over_time()
    print_table("Anonymous memory (Pss_Anon, MiB) over time, each process", ["process", *marks], rows)
    print(f"\nPostgreSQL: {', '.join(f'{k} {v}' for k, v in watch.settings.items())}")
    print_table("PostgreSQL's memory, a row a minute (MiB, proportional: summed over its processes, each page once;"
                " anon: private heap and stacks; shmem: the resident part of the shared segment)",
                ["min", "postmaster", "client backends", "other processes", "sessions by host", "anon", "largest anon",
                 "shmem", "file", "PSS", "RSS", "fds", "database MiB", "load"],
                watch.series_rows())
    if logged:
        print_table("Errors in the logs, by message (numbers and ids as #)", ["log", "message", "count"],
                    [[name, message.replace("|", "/"), n] for (name, message), n in logged.most_common(25)])
    for title, entries in (("Lost", found.lost), ("Duplicated", found.duplicated),
                           ("Jobs in SQL the bench was not told of (a submission answered with an error)", found.unacknowledged),
                           ("Problems", ledger.problems)):
        if entries:
            print(f"\n{title} ({len(entries)}{', the first 20' if len(entries) > 20 else ''}):")
            for entry in entries[:20]:
                print(f"- {entry}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the faulted phase")
    parser.add_argument("--seed", type=int, default=None, help="the faults' and the load's seed (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"the faults to draw from (default: {','.join(FAULTS)})")
    parser.add_argument("--shared-buffers", default=None,
                        help="PostgreSQL's shared_buffers, e.g. 16MB (default: the server's, 128MB): a small one shows"
                             " the shared memory levelling off within a short soak")
    args = parser.parse_args(argv)
    args.seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    kinds = tuple(k.strip() for k in args.faults.split(",") if k.strip())
    if not kinds or set(kinds) - set(FAULTS):
        parser.error(f"--faults: choose from {', '.join(FAULTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "corral.harness.sentinel", "corral.harness.netns"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    ok, why = can_make_namespaces()
    if ok and missing() is not None:
        ok, why = False, str(missing())
    if not ok:
        print(f"bench.chaos needs network namespaces (run it as root), Redis and PostgreSQL: {why}", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="corral-chaos-"))
    facts = {"command": " ".join(["env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python -m bench.chaos",
                                  *(argv if argv is not None else sys.argv[1:])]),
             "seed": str(args.seed), "load average at start (1/5/15 min)": loadavg(), "cores": str(os.cpu_count())}
    log.info("chaos soak: %g min, seed %d, logs in %s, load %s", args.minutes, args.seed, root,
             facts["load average at start (1/5/15 min)"])
    failed = True
    stop = threading.Event()
    try:
        with sigterm_as_interrupt():
            failed = soak(args, kinds, root, facts, stop)
    except KeyboardInterrupt:
        print("interrupted: everything started is being removed", file=sys.stderr)
        return 130
    finally:
        stop.set()
        if args.keep or failed:
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def soak(args: argparse.Namespace, kinds: tuple[str, ...], root: Path, facts: dict[str, str],
         stop: threading.Event) -> bool:
    """Deploy, warm up, fault for ``args.minutes`` under load, drain, audit, report; whether it failed (an item
    lost or duplicated).  Everything started is stopped and removed on the way out."""
    ledger = Ledger()
    with Network(HOSTS) as network, ChaosCluster(network, base_settings(root), root,
                                                               shared_buffers=args.shared_buffers) as cluster:
        try:
            started = time.monotonic()
            cluster.start_all()
            log.info("cluster on %s up in %.1f s (Redis %s)", network.subnet, time.monotonic() - started,
                     cluster.redis_url)
            watch = Watch(cluster)
            load = Load(cluster, ledger, args.seed)
            load.start()
            # warm-up: both models loaded and a job of each kind ended, before the first sample and fault
            try:
                wait_for(lambda: {j.kind for j in ledger.jobs if not load.open_jobs([j.job_id])}
                         >= {"generate", "embed", "batch"}, WARMUP_BOUND, "a job of each kind to end", interval=1.0)
            except TimeoutError as exc:
                ledger.problem(f"warm-up: {exc}")
            watch.read_settings()
            watch.sample("start")
            sampler_stop = threading.Event()

            def sampler() -> None:
                while not sampler_stop.wait(SAMPLE_EVERY):
                    with contextlib.suppress(Exception):
                        watch.sample()

            threading.Thread(target=sampler, daemon=True, name="sampler").start()
            faults = Faults(cluster, ledger, random.Random(args.seed), kinds)
            soak_started = time.monotonic()
            try:
                faults.run(soak_started + args.minutes * 60, stop)
            finally:
                faults.whole_again()
            soaked = time.monotonic() - soak_started
            log.info("faults stopped after %.1f min; stopping the load", soaked / 60)
            load.join(CHAT_TIMEOUT + 10)
            drained = wait_drained(load, ledger, DRAIN_BOUND)
            log.info("every job ended %.1f s after the load stopped; auditing", drained)
            sampler_stop.set()
            watch.sample("end")
            found = audit(cluster, ledger)
        finally:
            keep_postgres_log(cluster, root)
        facts.update({
            "load average at end (1/5/15 min)": loadavg(),
            "load average (1 min) during the soak, mean / max": watch.load_summary(),
            "faulted phase": f"{soaked / 60:.1f} min", "drain after the faults": f"{drained:.0f} s",
            "cluster": f"{network.subnet}, Redis {cluster.redis_url}",
            "Tracebacks in the logs": tracebacks(root),
        })
        report(args, ledger, found, watch, facts, errors(root))
        lost = sum(c["lost"] for c in found.by_kind.values())
        duplicated = sum(c["duplicated"] for c in found.by_kind.values())
        failed = bool(lost or duplicated)
        print(f"\n**{'FAIL' if failed else 'PASS'}**: {lost} lost, {duplicated} duplicated")
    leftovers = network.leftovers()
    if leftovers:
        print(f"left behind: {leftovers}", file=sys.stderr)
    return failed


if __name__ == "__main__":
    sys.exit(main())
