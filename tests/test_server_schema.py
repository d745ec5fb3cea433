"""Property-based run of schemathesis against the server's own /openapi.json, on loopback: generated requests (valid
and invalid) must never get a 5xx, and every response must match the status codes, content types and bodies the
schema declares. Bounded: a few dozen examples per operation, a small context window so generations stay short."""

from __future__ import annotations

import pytest

from tests.test_server_helpers import demo_engine, live_server

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = demo_engine(tmp_path_factory.mktemp("schema"), max_model_len=96)
    with live_server(engine) as (url, state):
        yield url, state
    engine.shutdown()


def test_openapi_fuzz_finds_no_5xx_and_no_schema_violation(server):
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi import checks as oa

    from schemathesis import checks as core

    url, state = server
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    wanted = [core.not_a_server_error, oa.status_code_conformance, oa.content_type_conformance,
              oa.response_schema_conformance]
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                               "/metrics", "/tokenize", "/detokenize"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(checks=wanted, timeout=60)

        run()
    assert state.engine.in_flight == 0
