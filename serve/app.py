"""The OpenAI-compatible HTTP layer over AsyncLLM: routes, errors as OpenAI's JSON, streaming (SSE).

No model or scheduling logic lives here: a request body becomes (prompts, SamplingParams), the engine's
async stream becomes OpenAI's response or chunks. A client's mistake is a 400 (never a 422 or a 500); a
client that goes away has its requests aborted, which frees their pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import jaxllm
from jaxllm.async_engine import AsyncLLM
from jaxllm.sampling import RequestOutput
from jaxllm.tokenizer import apply_chat_template
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"  # the web chat page at GET /


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None
                   ) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


class _Serving:
    """The engine once it is loaded (the server answers 503 until then)."""

    def __init__(self, llm: AsyncLLM, model_name: str) -> None:
        self.llm, self.engine, self.tokenizer = llm, llm.engine, llm.get_tokenizer()
        self.metrics = Metrics(llm.engine, model_name)


class _RequireAPIKey:
    """401 on /v1 routes without `Authorization: Bearer KEY`. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would hide client disconnects from the routes (Request.is_disconnected)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and \
                dict(scope["headers"]).get(b"authorization") != self.expected:
            response = error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                      "authentication_error")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(llm: AsyncLLM | Callable[[], AsyncLLM], served_model_name: str, api_key: str | None = None,
               max_queued_requests: int | None = None) -> FastAPI:
    """The app over `llm`, or over what `llm()` returns: then it loads in a thread at start-up, and until it
    is ready /health and every API route answer 503."""
    state: dict[str, _Serving] = {}

    def load() -> None:
        try:
            state["ready"] = _Serving(llm(), served_model_name)
        except Exception as e:  # surfaced by /health and the routes
            state["failed"] = e  # type: ignore[assignment]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if callable(llm) and not isinstance(llm, AsyncLLM):
            threading.Thread(target=load, name="jaxllm-load", daemon=True).start()
        else:
            state["ready"] = _Serving(llm, served_model_name)
        yield
        if "ready" in state:
            state["ready"].llm.shutdown()

    app = FastAPI(title="jaxllm", version=jaxllm.__version__, lifespan=lifespan)

    def serving() -> _Serving:
        if "ready" not in state:
            failed = state.get("failed")
            raise APIError(503, f"the model failed to load: {failed}" if failed else "the model is still loading",
                           "service_unavailable")
        return state["ready"]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}" if where else str(e),
                              param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error")

    if api_key:
        app.add_middleware(_RequireAPIKey, key=api_key)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                           "not_found_error", "model")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        serving()
        return {}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(serving().metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/version")
    async def version() -> dict:
        return {"version": jaxllm.__version__}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "jaxllm",
                                            "max_model_len": serving().engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        check_model(req.model)
        tokenizer = serving().tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages")
        if req.messages is not None:
            ids = chat_ids(req.messages, None, True)
        else:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": serving().engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        check_model(req.model)
        vocab = serving().engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": serving().tokenizer.decode(req.tokens)}

    def chat_ids(messages: list, template: str | None, add_generation_prompt: bool) -> list[int]:
        try:
            return apply_chat_template(serving().tokenizer, [m.as_template_message() for m in messages],
                                       chat_template=template, add_generation_prompt=add_generation_prompt)
        except (ValueError, jinja2.TemplateError) as e:  # no template, or one that fails on these messages
            raise APIError(400, f"the chat template could not be applied: {e}", param="messages") from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        check_model(req.model)
        params = sampling(req, req.max_tokens, req.logprobs)
        try:
            prompts = req.prompts()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        if req.echo and req.stream:
            raise APIError(400, "echo is not supported with stream", param="echo")
        if req.echo and req.logprobs is not None:  # the prompt's tokens get logprobs too, as OpenAI's API does
            params.prompt_logprobs = req.logprobs
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await respond(raw, req, rid, "text_completion", prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Any:
        check_model(req.model)
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format {req.response_format.type!r} is not supported yet (no "
                                "structured output); use {'type': 'text'}", param="response_format")
        try:
            k = req.num_logprobs()
        except ValueError as e:
            raise APIError(400, str(e), param="top_logprobs") from None
        params = sampling(req, req.max_new_tokens(), k)
        prompt = {"prompt_token_ids": chat_ids(req.messages, req.chat_template, req.add_generation_prompt)}
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await respond(raw, req, rid, "chat.completion", [prompt], params, chat=True)

    def sampling(req: Any, max_tokens: int | None, logprobs: int | None) -> Any:
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def start(prompts: list, params: Any, rid: str) -> list[tuple[AsyncIterator, RequestOutput]]:
        """Queue every prompt and wait for each one's first output, so that a bad request is a 400 before any
        byte of a 200 is sent; on any failure the ones already queued are aborted."""
        llm = serving().llm
        if max_queued_requests is not None and len(llm.engine.scheduler.waiting) >= max_queued_requests:
            raise APIError(429, f"the server has {max_queued_requests} requests waiting already; retry later",
                           "rate_limit_error")
        streams: list[tuple[AsyncIterator, RequestOutput]] = []
        try:
            for i, prompt in enumerate(prompts):
                gen = llm.generate(prompt, params, request_id=f"{rid}-{i}")
                streams.append((gen, await gen.__anext__()))
        except (ValueError, TypeError) as e:
            for gen, _ in streams:
                await gen.aclose()
            raise APIError(400, str(e)) from None
        return streams

    async def respond(raw: Request, req: Any, rid: str, kind: str, prompts: list, params: Any, chat: bool) -> Any:
        streams = await start(prompts, params, rid)
        created, model = int(time.time()), served_model_name
        if req.stream:
            return StreamingResponse(sse(streams, req, rid, kind, created, model, chat), media_type="text/event-stream")
        finals = await until_disconnect(raw, [drain(gen, first) for gen, first in streams])
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, out in enumerate(finals):
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                index = p * params.n + c.index
                if chat:
                    choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                    "logprobs": chat_logprobs(c.logprobs, c.token_ids, params.logprobs or 0),
                                    "finish_reason": c.finish_reason})
                else:
                    echo = (out.prompt or serving().tokenizer.decode(out.prompt_token_ids)) if req.echo else ""
                    text = echo + c.text
                    lp = completion_logprobs(c.logprobs, c.token_ids)
                    if lp is not None and req.echo:
                        lp = join_logprobs(prompt_logprobs(out), lp)
                    choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    async def drain(gen: AsyncIterator, last: RequestOutput) -> RequestOutput:
        async for out in gen:
            last = out
        serving().metrics.observe(last)
        return last

    async def until_disconnect(raw: Request, coros: list) -> list[RequestOutput]:
        """Await the requests, aborting them all if the client goes away first."""
        task = asyncio.ensure_future(asyncio.gather(*coros))
        while not task.done():
            await asyncio.wait([task], timeout=0.1)
            if not task.done() and await raw.is_disconnected():
                task.cancel()  # closes the generators, which aborts their requests
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "client disconnected")
        return task.result()

    async def sse(streams: list, req: Any, rid: str, kind: str, created: int, model: str, chat: bool
                  ) -> AsyncIterator[str]:
        n = req.n
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int, gen: AsyncIterator, first: RequestOutput) -> None:
            await queue.put((p, first))
            async for out in gen:
                await queue.put((p, out))
            await queue.put((p, None))

        tasks = [asyncio.ensure_future(pump(p, gen, first)) for p, (gen, first) in enumerate(streams)]
        sent: dict[int, int] = {}
        prompt_tokens, completion_tokens, live = 0, {}, len(streams)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                for p in range(len(streams)):
                    for i in range(n):
                        yield event(rid, chunk_kind, created, model, [
                            {"index": p * n + i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
            while live:
                p, out = await queue.get()
                if out is None:
                    live -= 1
                    continue
                prompt_tokens_p = len(out.prompt_token_ids)
                choices = []
                for c in out.outputs:
                    index = p * n + c.index
                    new = c.text[sent.get(index, 0):]
                    done = c.finish_reason is not None and index not in completion_tokens
                    if not new and not done:
                        continue
                    sent[index] = len(c.text)
                    if done:
                        completion_tokens[index] = len(c.token_ids)
                    if chat:
                        choices.append({"index": index, "delta": {"content": new} if new else {}, "logprobs": None,
                                        "finish_reason": c.finish_reason if done else None})
                    else:
                        choices.append({"index": index, "text": new, "logprobs": None,
                                        "finish_reason": c.finish_reason if done else None})
                if out.finished:
                    prompt_tokens += prompt_tokens_p
                    serving().metrics.observe(out)
                if choices:
                    yield event(rid, chunk_kind, created, model, choices)
            if req.include_usage:
                yield event(rid, chunk_kind, created, model, [],
                            usage=usage(prompt_tokens, sum(completion_tokens.values())))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for gen, _ in streams:
                await gen.aclose()

    def chat_logprobs(entries: list | None, token_ids: list[int], k: int) -> dict | None:
        if entries is None:
            return None

        def item(lp: Any) -> dict:
            return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list(lp.decoded_token.encode())}

        content = []
        for tok, entry in zip(token_ids, entries):
            tops = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
            content.append({**item(entry[tok]), "top_logprobs": [item(lp) for lp in tops]})
        return {"content": content}

    def prompt_logprobs(out: RequestOutput) -> dict:
        """The echoed prompt's tokens in the completions logprobs format (the first token has none)."""
        tokens = [serving().tokenizer.decode([t]) for t in out.prompt_token_ids]
        entries = out.prompt_logprobs or [None] * len(tokens)
        return {"tokens": tokens,
                "token_logprobs": [e[t].logprob if e else None for t, e in zip(out.prompt_token_ids, entries)],
                "top_logprobs": [{lp.decoded_token: lp.logprob for lp in e.values()} if e else None for e in entries],
                "text_offset": []}

    def join_logprobs(head: dict, tail: dict) -> dict:
        joined = {k: head[k] + tail[k] for k in ("tokens", "token_logprobs", "top_logprobs")}
        joined["text_offset"], pos = [], 0
        for text in joined["tokens"]:
            joined["text_offset"].append(pos)
            pos += len(text)
        return joined

    def completion_logprobs(entries: list | None, token_ids: list[int]) -> dict | None:
        if entries is None:
            return None
        tokens = [entry[t].decoded_token for t, entry in zip(token_ids, entries)]
        offsets, pos = [], 0
        for text in tokens:
            offsets.append(pos)
            pos += len(text)
        return {"tokens": tokens, "token_logprobs": [entry[t].logprob for t, entry in zip(token_ids, entries)],
                "top_logprobs": [{lp.decoded_token: lp.logprob for lp in entry.values()} for entry in entries],
                "text_offset": offsets}

    return app


def event(rid: str, kind: str, created: int, model: str, choices: list, usage: dict | None = None) -> str:
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
