"""The `jaxllm` command as a user runs it: a separate process through the installed console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_smollm2 import CONTINUATION, PROMPT


def jaxllm(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("jaxllm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "jaxllm.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, input=input)


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "jaxllm"]
    assert ep.value == "jaxllm.cli:main"


def test_generate_default_model():
    out = jaxllm("generate", PROMPT, "--max-tokens", "20", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PROMPT + CONTINUATION + "\n"


def test_convert_then_generate(tiny_model, tmp_path):
    path, _ = tiny_model("qwen3")
    out = jaxllm("convert", str(path), str(tmp_path / "ckpt"), "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert "Qwen3ForCausalLM, float32" in out.stdout
    a = jaxllm("generate", "The quick", "--model", str(path), "--max-tokens", "8", "--ignore-eos")
    b = jaxllm("generate", "The quick", "--model", str(tmp_path / "ckpt"), "--max-tokens", "8", "--ignore-eos")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("The quick")


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--model", "/no/such/dir"], "model path '/no/such/dir' does not exist"),
    (["generate", "hi", "--dtype", "int3"], "dtype 'int3' is not supported"),
])
def test_errors_are_one_line(args, message):
    out = jaxllm(*args)
    assert out.returncode == 2
    assert f"jaxllm: error: {message}" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_lists_commands():
    out = jaxllm("--help")
    assert out.returncode == 0 and "generate" in out.stdout and "convert" in out.stdout


def test_chat_piped_multi_turn(tiny_model):
    """Piped input: one reply per line, each turn sees the conversation so far; /system sets the system prompt
    and clears the conversation, /reset clears it (the system prompt stays). Replies equal LLM.chat's greedy
    replies to the same conversations."""
    from jaxllm import LLM, SamplingParams

    path, _ = tiny_model("llama2")
    script = "Hello there\n/system Be brief\nAnd again\nMore\n/reset\n\n/bogus\nAnd again\n/quit\nnot read\n"
    out = jaxllm("chat", str(path), "--max-tokens", "6", "--ignore-eos", "--dtype", "float32", input=script)
    assert out.returncode == 0, out.stderr
    assert "unknown command /bogus" in out.stderr
    llm = LLM(str(path), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def reply(*turns: tuple[str, str]) -> str:
        conv = [{"role": r, "content": c} for r, c in turns]
        return llm.chat(conv, params, use_tqdm=False)[0].outputs[0].text

    system = ("system", "Be brief")
    first, again = reply(("user", "Hello there")), reply(system, ("user", "And again"))
    more = reply(system, ("user", "And again"), ("assistant", again), ("user", "More"))
    assert out.stdout == f"{first}\n{again}\n{more}\n{again}\n"  # (a reply may itself hold a newline)


def test_chat_default_model_remembers_the_conversation():
    out = jaxllm("chat", "--max-tokens", "40", input="What is the capital of France?\nAnd of Germany?\n")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("\n")[:2]
    assert first == "The capital of France is Paris."
    assert "Berlin" in second
