"""AsyncLLM: the engine for asyncio code (the HTTP server): `async for out in llm.generate(...)` streams.

One background thread owns the LLMEngine: it takes the callers' new requests and aborts from an inbox, runs
`step()` while any request is unfinished, and hands each request's outputs to its asyncio queue. The event
loop never waits for the engine: it only puts into the inbox (a lock-free queue) and wakes the thread, so
a step in flight (milliseconds on a GPU, while the thread holds the engine) never blocks other clients.
(An earlier version made callers take the engine's lock from the event loop; under load the engine thread
re-took it between steps first, and on the H100 the server admitted one request at a time.) A caller that
stops iterating early (a client that disconnected) aborts its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import Any, AsyncIterator

from jaxllm.engine import LLMEngine, PromptType
from jaxllm.sampling import RequestOutput, SamplingParams

logger = logging.getLogger("jaxllm")


class AsyncLLM:
    """Streaming generation over one LLMEngine shared by many concurrent callers."""

    def __init__(self, model: Any = None, *, engine: LLMEngine | None = None, **kwargs: Any) -> None:
        self.engine = engine if engine is not None else LLMEngine(model, **kwargs)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", ...) / ("abort", request_id)
        self._wake = threading.Condition()  # held only to sleep and to wake, never during a step
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it, the last one finished.
        Bad input raises (ValueError/TypeError) at the first iteration, before the request is queued."""
        if self._stopped:
            raise RuntimeError("the engine has shut down")
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        self._post(("add", rid, prompt, sampling_params, priority, loop, outputs))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    finished = True  # nothing of it is queued (bad input) or it was aborted (a failed step)
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._post(("stop",))
        self._thread.join(timeout=10)

    def _post(self, item: tuple) -> None:
        self._inbox.put(item)
        with self._wake:
            self._wake.notify()

    def _drain_inbox(self) -> bool:
        """Apply the callers' adds and aborts (engine thread); False once shut down."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item[0] == "stop":
                return False
            if item[0] == "abort":
                self._queues.pop(item[1], None)
                self.engine.abort_request(item[1])
                continue
            _, rid, prompt, params, priority, loop, outputs = item
            try:
                self.engine.add_request(rid, prompt, params, priority=priority)
            except Exception as e:  # bad input: the caller raises it
                _send(loop, outputs, e)
                continue
            self._queues[rid] = (loop, outputs)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._inbox.empty() and not self.engine.has_unfinished_requests():
                    self._wake.wait()
            if not self._drain_inbox():
                return
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the step failed: fail every waiting caller rather than hang them
                logger.exception("engine step failed")
                for rid, (loop, q) in list(self._queues.items()):
                    _send(loop, q, e)
                    self.engine.abort_request(rid)
                self._queues.clear()
                continue
            for out in outputs:
                target = self._queues.get(out.request_id)
                if target is None:
                    continue
                if not _send(*target, out):  # its caller's event loop is gone: nobody will read the rest
                    self.engine.abort_request(out.request_id)
                    del self._queues[out.request_id]
                elif out.finished:
                    del self._queues[out.request_id]


def _send(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, item: Any) -> bool:
    """Hand an output (or an exception) to a caller's queue from the engine thread; False if its loop closed
    (a caller that finished its asyncio.run while its aborted request still had a step in flight)."""
    try:
        loop.call_soon_threadsafe(outputs.put_nowait, item)
        return True
    except RuntimeError:
        return False
