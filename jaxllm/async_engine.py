"""AsyncLLM: the engine for asyncio code (the HTTP server): `async for out in llm.generate(...)` streams.

One background thread runs `LLMEngine.step()` while any request is unfinished and hands each request's
outputs to its asyncio queue; callers add and abort requests from their event loop. A lock serialises
the engine between the two, so a new request waits at most one step to be queued. A caller that stops
iterating early (a client that disconnected) aborts its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator

from jaxllm.engine import LLMEngine, PromptType
from jaxllm.sampling import RequestOutput, SamplingParams

logger = logging.getLogger("jaxllm")


class AsyncLLM:
    """Streaming generation over one LLMEngine shared by many concurrent callers."""

    def __init__(self, model: Any = None, *, engine: LLMEngine | None = None, **kwargs: Any) -> None:
        self.engine = engine if engine is not None else LLMEngine(model, **kwargs)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it, the last one finished.
        Bad input raises (ValueError/TypeError) before anything is queued."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._work:
            if self._stopped:
                raise RuntimeError("the engine has shut down")
            rid = self.engine.add_request(request_id, prompt, sampling_params, priority=priority)
            self._queues[rid] = (loop, queue)
            self._work.notify()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._work:
            self._queues.pop(request_id, None)
            self.engine.abort_request(request_id)

    def shutdown(self) -> None:
        with self._work:
            self._stopped = True
            self._work.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._work:
                while not self._stopped and not self.engine.has_unfinished_requests():
                    self._work.wait()
                if self._stopped:
                    return
                try:
                    outputs = self.engine.step()
                except Exception as e:  # the step failed: fail every waiting caller rather than hang them
                    logger.exception("engine step failed")
                    for rid, (loop, queue) in list(self._queues.items()):
                        loop.call_soon_threadsafe(queue.put_nowait, e)
                        self.engine.abort_request(rid)
                    self._queues.clear()
                    continue
                for out in outputs:
                    target = self._queues.get(out.request_id)
                    if target is not None:
                        target[0].call_soon_threadsafe(target[1].put_nowait, out)
                        if out.finished:
                            del self._queues[out.request_id]
