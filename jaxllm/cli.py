"""The `jaxllm` command: generate, chat, serve, bench, convert."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, TextIO

from jaxllm.config import JaxLLMError

CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /quit"


def _add_model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    help_ = "HF directory, GGUF file, jaxllm checkpoint or hub id (default: embedded SmolLM2-135M-Instruct)"
    if positional:
        p.add_argument("model", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--model", default=None, help=help_)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, if not the model's")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 | float16")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-pages", type=int, default=None, help="KV pool size in pages (default: from memory)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--attention-backend", default="auto", help="auto | pallas | reference | xla")
    p.add_argument("--quantization", default=None, help="int8 | int4: weight-only, quantized at load; awq | gguf: "
                   "the checkpoint's own 4/8-bit weights (AWQ checkpoints are found from config.json)")
    p.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="with --quantization, the LM head in int8 too (default; --no-quantize-lm-head keeps it float)")
    p.add_argument("--load-format", default="auto", help="auto | dummy (random weights from config.json, to time)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) | int8 (a scale per token "
                   "and KV head: half the bytes of bf16)")
    p.add_argument("--num-scheduler-steps", type=int, default=None,
                   help="decode steps per launch while every sequence decodes (default: 8 for quantized weights on "
                   "a GPU, whose batch-1 decode it makes 1.3-1.6x faster, compiled in the background after start-up; "
                   "else 1)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _sampling_params(args: argparse.Namespace) -> Any:
    from jaxllm import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed,
                          stop=args.stop, ignore_eos=args.ignore_eos)


def _engine(args: argparse.Namespace, **knobs: Any) -> Any:
    from jaxllm.engine import LLMEngine

    return LLMEngine(args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
                     num_kv_pages=args.num_kv_pages, tensor_parallel_size=args.tensor_parallel_size,
                     attention_backend=args.attention_backend, quantization=args.quantization,
                     quantize_lm_head=args.quantize_lm_head, kv_cache_dtype=args.kv_cache_dtype,
                     load_format=args.load_format, num_scheduler_steps=args.num_scheduler_steps, **knobs)


def stream(engine: Any, prompt: Any, params: Any, out: TextIO) -> Any:
    """Run one request to the end, writing its text to `out` as it comes; returns the final output."""
    engine.add_request("cli", prompt, params)
    written, final = 0, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            text = o.outputs[0].text
            out.write(text[written:])
            out.flush()
            written, final = len(text), o
    return final


def _generate(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    engine = _engine(args, max_num_seqs=1, warmup=False)  # one prompt: compile only the shapes it uses
    params = _sampling_params(args)
    t1 = time.perf_counter()
    if args.chat:
        from jaxllm.tokenizer import apply_chat_template

        prompt: Any = {"prompt_token_ids": apply_chat_template(engine.tokenizer,
                                                               [{"role": "user", "content": args.prompt}])}
    else:
        prompt = args.prompt
        sys.stdout.write(args.prompt)
    final = stream(engine, prompt, params, sys.stdout)
    sys.stdout.write("\n")
    completion = final.outputs[0]
    if args.verbose:
        print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}, "
              f"load {t1 - t0:.1f} s, generate {time.perf_counter() - t1:.1f} s (includes compilation)]",
              file=sys.stderr)


def _chat(args: argparse.Namespace) -> None:
    """An interactive multi-turn chat on the terminal (or over piped input, one message per line)."""
    from jaxllm.tokenizer import apply_chat_template

    interactive = sys.stdin.isatty()
    if interactive:
        print("loading the model and compiling (the first start takes longest) ...", file=sys.stderr)
    engine = _engine(args, max_num_seqs=1, max_num_batched_tokens=args.max_num_batched_tokens)
    logging.getLogger("jaxllm").setLevel(logging.WARNING)  # start-up progress shown; no stats lines mid-chat
    params = _sampling_params(args)
    system = args.system
    history: list[dict] = []
    if interactive:
        print(f"jaxllm chat ({CHAT_HELP})", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = []
            print("[conversation cleared]", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            print(f"[system prompt {'set' if system else 'cleared'}; conversation cleared]", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}; {CHAT_HELP}]", file=sys.stderr)
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": text})
        try:
            prompt = {"prompt_token_ids": apply_chat_template(engine.tokenizer, messages)}
            final = stream(engine, prompt, params, sys.stdout)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"[{e}; /reset starts a new conversation]", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history += [messages[-1], {"role": "assistant", "content": final.outputs[0].text}]
        if final.outputs[0].finish_reason == "length":
            print("[reply cut at --max-tokens]", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from serve import run_server

    run_server(args.model, host=args.host, port=args.port, api_key=args.api_key,
               served_model_name=args.served_model_name, max_queued_requests=args.max_queued_requests,
               tokenizer=args.tokenizer, dtype=args.dtype,
               max_model_len=args.max_model_len, num_kv_pages=args.num_kv_pages,
               tensor_parallel_size=args.tensor_parallel_size, attention_backend=args.attention_backend,
               quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
               load_format=args.load_format, max_num_seqs=args.max_num_seqs,
               kv_cache_dtype=args.kv_cache_dtype, num_scheduler_steps=args.num_scheduler_steps,
               max_num_batched_tokens=args.max_num_batched_tokens)


def _convert(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from jaxllm.weights import convert_checkpoint

    t0 = time.perf_counter()
    loaded = convert_checkpoint(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {args.dst}: {loaded.config.architecture}, {jnp.dtype(loaded.dtype).name}, "
          f"{time.perf_counter() - t0:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="LLM inference in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt and print the text as it is generated")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_sampling_args(g, max_tokens=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("-v", "--verbose", action="store_true", help="print token count and timings to stderr")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="chat with a model in the terminal (multi-turn, streaming)",
                       description=f"Interactive chat through the model's chat template; {CHAT_HELP}.")
    _add_model_args(c, positional=True)
    _add_sampling_args(c, max_tokens=512)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-num-batched-tokens", type=int, default=512, help="prefill chunk size")
    c.set_defaults(func=_chat)

    s = sub.add_parser("serve", help="serve the OpenAI API (completions, chat, streaming) over HTTP")
    _add_model_args(s, positional=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    s.add_argument("--max-queued-requests", type=int, default=None,
                   help="answer 429 while this many requests wait (default: no limit)")
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.set_defaults(func=_serve)

    from jaxllm import bench

    bench.add_parser(sub, _add_model_args)

    v = sub.add_parser("convert", help="write a model as a jaxllm (Orbax) checkpoint that loads faster")
    v.add_argument("src", help="HF directory, GGUF file or hub id ('default' for the embedded model)")
    v.add_argument("dst", help="new directory to write")
    v.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32 | float16")
    v.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "src", None) == "default":
        args.src = None
    # Progress and stats lines for a server and a terminal chat; a one-shot generate or piped input stays quiet.
    verbose = args.command == "serve" or (args.command == "chat" and sys.stdin.isatty())
    logging.getLogger("jaxllm").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        args.func(args)
    except (JaxLLMError, ValueError, NotImplementedError) as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
