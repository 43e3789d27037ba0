"""`kopru serve`: an OpenAI-compatible HTTP server for a saved Köprü model."""

from kopru.serve.app import *  # noqa: F403
from kopru.serve.app import LIMIT_HELP  # noqa: F401
