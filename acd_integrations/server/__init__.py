"""``acd serve``: an OpenAI-compatible HTTP server over the ACD engine (extra ``[serve]``).

``create_app`` builds the FastAPI app; ``run_server`` serves it with uvicorn. See
``docs/serving.md``.
"""

from __future__ import annotations

from acd_integrations.server.app import ServerOptions, create_app, run_server, serve_in_thread

__all__ = ["ServerOptions", "create_app", "run_server", "serve_in_thread"]
