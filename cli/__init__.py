"""The ``corral`` command line: the top of the import graph (nothing imports it).

Server commands (``up``, ``serve``, ``worker``, ``db``, ``keys``) run this machine's processes; the job and model
commands talk HTTP to a corral server through :mod:`cli.client`, like the ``ollama`` CLI.  Client-side helpers
live here too: :mod:`cli.corpus` turns documents into chunks for ``corral embed`` and :mod:`cli.launcher` runs
everything on one machine (``corral up``).  Results are written as JSONL, CSV, Parquet or npy by
:mod:`jobs.export`, which the operator console's downloads share.
"""
