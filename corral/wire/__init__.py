"""The wire formats, one module each: :mod:`~corral.wire.ollama` (Ollama's native requests and replies),
:mod:`~corral.wire.openai` (OpenAI's, with their translation to and from native requests and the stream
translator), :mod:`~corral.wire.jobs` (the batch-job and batch bodies) and :mod:`~corral.wire.responses` (the
reply schemas ``/openapi.json`` shows).  They live in the shared core because the API parses requests with them
and the job domain and the workers build the same shapes for batch lines and results."""
