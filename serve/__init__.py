"""The OpenAI-compatible HTTP layer over jaxllm's engine (FastAPI + uvicorn).

Empty in this release: the server is built on the continuous-batching engine, which comes first.
"""
