"""Fuzz the server's OpenAPI schema with schemathesis (a bounded run): no request it generates gets a 5xx.

The server runs a tiny model with a 64-token context, so that every accepted request is cheap whatever n or
max_tokens the fuzzer picks (anything longer is a 400).
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from jaxllm.async_engine import AsyncLLM
from serve.app import create_app
from tests.test_server import start, stop


def api_schema_base(tiny_model):
    path, _ = tiny_model("llama2")
    llm = AsyncLLM(str(path), dtype="float32", num_kv_pages=256, page_size=8, max_num_seqs=32,
                   max_num_batched_tokens=64, max_model_len=64)
    return llm, start(create_app(llm, "tiny"))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    llm, (base, srv, thread) = api_schema_base(tiny_model)
    yield base
    stop(srv, thread)
    llm.shutdown()


def test_no_server_errors(fuzz_server):
    """Every operation, up to 25 generated cases each (schemathesis' pytest plugin predates pytest 9, so the
    operations are driven through hypothesis directly)."""
    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        @given(operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        check()
