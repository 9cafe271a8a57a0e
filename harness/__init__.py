"""Real processes on one machine, for ``corral up``, the tests and the benches alike.

:mod:`harness.processes` holds the process utilities: a free loopback port, a private ``redis-server``, stopping
a child gracefully, and the Linux signal that takes a child down with its parent, plus :func:`redis_or_private`,
the one rule for "the Redis ``REDIS_URL`` names if it answers, else a private one".  :mod:`harness.stack` runs a
worker and an API server as child processes (``python -m cli``), each with its log, against one set of settings,
on a freshly migrated database.

The harness sits beside the API and the workers, above the job domain: it imports ``corral`` and ``jobs`` only,
and starts the other processes rather than importing them.  The CLI (``corral up``), the tests and the benches
import it; nothing below it does.
"""
