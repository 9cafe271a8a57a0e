"""The batch-job domain: SQL models, submission, fan-out, the job/chunk/item state machine, status, results,
the OpenAI Files and Batches services, API keys and vector search.  Imported by the API, the workers and the CLI;
imports only :mod:`corral`."""
