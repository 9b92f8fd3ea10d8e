"""``trio_runner.serve``: an OpenAI-compatible HTTP API over a supervised MLX runner, on trio.

hypercorn's trio worker serves a Starlette application in the caller's
nursery, so the API shares the event loop with the supervisor and keeps
answering while the runner crashes and restarts. Nothing imports this package
by default: it needs the ``serve`` extra (hypercorn, starlette,
prometheus-client), and ``import trio_runner`` stays light.
"""

from __future__ import annotations

from ._app import MAX_BODY_SIZE as MAX_BODY_SIZE
from ._metrics import ServeMetrics as ServeMetrics
from ._server import DEMO_MODEL_ID as DEMO_MODEL_ID
from ._server import OpenAIServer as OpenAIServer
from ._server import model_id_for as model_id_for
from ._server import run_server as run_server
from ._server import serve_mlx as serve_mlx
