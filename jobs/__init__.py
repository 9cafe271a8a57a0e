"""The batch-job domain: SQL models, submission, fan-out, status, results, and the `corral` CLI."""
