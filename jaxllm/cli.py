"""The `jaxllm` command: generate, convert (serve, chat and bench come with their issues)."""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from jaxllm.config import JaxLLMError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory, GGUF file, jaxllm checkpoint or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, if not the model's")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 | float16")


def _generate(args: argparse.Namespace) -> None:
    from jaxllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    t1 = time.perf_counter()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    t2 = time.perf_counter()
    completion = out.outputs[0]
    print(completion.text if args.chat else args.prompt + completion.text)
    if args.verbose:
        print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}, "
              f"load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s (includes compilation)]", file=sys.stderr)


def _convert(args: argparse.Namespace) -> None:
    from jaxllm.weights import convert_checkpoint

    t0 = time.perf_counter()
    loaded = convert_checkpoint(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {args.dst}: {loaded.config.architecture}, {jnp.dtype(loaded.dtype).name}, "
          f"{time.perf_counter() - t0:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="LLM inference in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt greedily and print the text")
    g.add_argument("prompt")
    _add_model_args(g)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("-v", "--verbose", action="store_true", help="print token count and timings to stderr")
    g.set_defaults(func=_generate)

    c = sub.add_parser("convert", help="write a model as a jaxllm (Orbax) checkpoint that loads faster")
    c.add_argument("src", help="HF directory, GGUF file or hub id ('default' for the embedded model)")
    c.add_argument("dst", help="new directory to write")
    c.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32 | float16")
    c.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "src", None) == "default":
        args.src = None
    try:
        args.func(args)
    except (JaxLLMError, ValueError, NotImplementedError) as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
