"""`kopru serve`: an OpenAI-compatible HTTP server for a saved Köprü model, plus a small web demo page.

One background thread owns the model. It takes the queued requests, waits a short window for more to arrive,
and runs them as one batch through `GenerationEngine.stream`, handing each request its own events; the HTTP
side never touches the model or its tokenizer (a fast tokenizer changing its padding settings in one thread
while another encodes fails with "Already borrowed"), so the chat template is rendered there too. A client
that goes away cancels only its own request; a batch whose clients have all gone is stopped.

A request fails alone: every field is checked (types, finite numbers, ranges, encodable text, sizes) before it
reaches the worker, and whatever still goes wrong while one request is admitted, tokenized, batched or generated
answers that request, while the others go on. A batch that fails before its first token is retried one request
at a time, so that only the request at fault fails. Should the worker thread die all the same, /health answers
503 and a supervisor thread starts a new one. Every error is answered with an OpenAI-style body,
{"error": {"message", "type", "param", "code"}}.

By concern:

- `limits`: `ServerLimits` (each a flag), `Budget` / `Reservation` (what all requests in progress hold);
- `security`: `ServerSecurity` and the `SecurityGuard` middleware (Host allow-list, API key, JSON-only POSTs);
- `errors`: `APIError`, the OpenAI-style error body;
- `images`: `data:` URLs and local files to images, within the limits;
- `parsing`: a body to bounded JSON and to a validated `ChatRequest`;
- `worker`: `BatchingWorker`, the one thread that owns the model;
- `app`: the routes' handlers, `ServerState` and `create_app`, `load_server`;
- `server`: uvicorn settings (Köprü's read timeout) and `run_server`.
"""

from kopru.serve.app import ServerState, create_app, load_server, served_model_name
from kopru.serve.errors import APIError
from kopru.serve.images import decode_image, read_image_url, read_local_file
from kopru.serve.limits import LIMIT_HELP, Budget, Reservation, ServerLimits
from kopru.serve.parsing import SEED_RANGE, ChatRequest, decode_json_body, parse_chat_request
from kopru.serve.security import SecurityGuard, ServerSecurity
from kopru.serve.server import read_timeout_protocol, run_server, uvicorn_config
from kopru.serve.worker import BatchingWorker, GenerationJob

__all__ = ["LIMIT_HELP", "SEED_RANGE", "APIError", "BatchingWorker", "Budget", "ChatRequest", "GenerationJob", "Reservation",
           "SecurityGuard", "ServerLimits", "ServerSecurity", "ServerState", "create_app", "decode_image",
           "decode_json_body", "load_server", "parse_chat_request", "read_image_url", "read_local_file",
           "read_timeout_protocol", "run_server", "served_model_name", "uvicorn_config"]
