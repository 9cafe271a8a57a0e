"""Benchmarks, each a script run from the checkout (``python bench/<name>.py``; see bench/README.md).

A package so that its imports are checked (import-linter's bench contracts): a bench uses the core, the job
domain, the workers, the API and the harness, never the tests or the CLI.
"""
