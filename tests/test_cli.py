"""The `jaxllm` command as a user runs it: a separate process through the installed console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_smollm2 import CONTINUATION, PROMPT


def jaxllm(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("jaxllm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "jaxllm.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600)


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
