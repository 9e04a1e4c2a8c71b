"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over jaxllm's AsyncLLM: `jaxllm serve`."""

from __future__ import annotations

from typing import Any


def run_server(model: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, max_queued_requests: int | None = None,
               **engine_kwargs: Any) -> None:
    """Listen at once (/health answers 503 while the model loads and compiles), then serve until
    SIGINT/SIGTERM, which stops accepting, lets running requests end for up to 10 s, and exits."""
    import uvicorn

    from jaxllm.async_engine import AsyncLLM
    from serve.app import create_app

    name = served_model_name or (str(model) if model is not None else "SmolLM2-135M-Instruct")
    app = create_app(lambda: AsyncLLM(model, **engine_kwargs), name, api_key, max_queued_requests)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
