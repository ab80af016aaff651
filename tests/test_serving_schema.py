"""schemathesis against the server's OpenAPI description (mock model): whatever it sends, no 5xx, and every
error is in OpenAI's shape. schemathesis comes with the `test` extra."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from test_serving_api import POLICY, make_config, running

AUTH = {"Authorization": "Bearer key-alice"}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    d = tmp_path_factory.mktemp("schema")
    (d / "policy.yaml").write_text(POLICY)
    with running(make_config(d / "state", d / "policy.yaml", max_queue=8)) as (svc, url):
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def _fuzz(op, mode, seen: dict) -> None:
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "mock"  # past the model check, into generation
        response = case.call(headers=AUTH, timeout=60)
        seen[(op.label, response.status_code)] = seen.get((op.label, response.status_code), 0) + 1
        assert response.status_code < 500, (op.label, response.text)
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"}, (op.label, body)
            assert set(body["error"]) == {"message", "type", "param", "code"}, (op.label, body)
            assert isinstance(body["error"]["message"], str) and body["error"]["message"]

    try:
        check()
    except Unsatisfiable:  # negative data for an operation without parameters: nothing to send
        assert mode == schemathesis.GenerationMode.NEGATIVE


def test_no_server_errors_and_every_error_in_openai_shape(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    seen: dict = {}
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _fuzz(op, mode, seen)
    codes = {code for _, code in seen}
    assert 200 in codes and 400 in codes and 404 in codes
