"""corral: shared core of the API, the workers and the CLI (settings, errors, protocol, model store)."""

from __future__ import annotations

from corral.errors import CorralError
from corral.settings import Settings

__version__ = "0.1.0"
# The Ollama version /api/version reports: the API level corral implements (shared/reference/ollama-api.md
# describes v0.33.0-rc2; corral follows the last release before it, images aside: README "Ollama API").
OLLAMA_COMPAT_VERSION = "0.32.15"

__all__ = ["CorralError", "OLLAMA_COMPAT_VERSION", "Settings", "__version__"]
