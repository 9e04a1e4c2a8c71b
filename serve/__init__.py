"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over jaxllm's AsyncLLM: `jaxllm serve`."""

from __future__ import annotations

from typing import Any


def run_server(model: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, **engine_kwargs: Any) -> None:
    """Load the model (compiling every step shape), then serve until SIGINT/SIGTERM."""
    import uvicorn

    from jaxllm.async_engine import AsyncLLM
    from serve.app import create_app

    llm = AsyncLLM(model, **engine_kwargs)
    name = served_model_name or (str(model) if model is not None else "SmolLM2-135M-Instruct")
    try:
        uvicorn.run(create_app(llm, name, api_key), host=host, port=port, log_level="info",
                    timeout_graceful_shutdown=10)
    finally:
        llm.shutdown()
