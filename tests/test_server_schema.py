"""Schemathesis against the server's own OpenAPI document: requests generated from it, valid and
not, to every operation of a live server; no answer may be a 5xx or stray from the document.

Hypothesis drives the strategies directly (schemathesis's pytest plugin does not run under this
pytest). The server caps `steps` at 4 so that the valid generations it draws stay quick.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import live_server, tiny_model

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    import unclip

    with live_server(unclip.load(tiny_model(tmp_path_factory)), max_steps=4) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_makes_the_server_fail_or_stray_from_its_document(api_schema, mode):
    operations = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert {("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"), ("POST", "/v1/images/variations"),
            ("GET", "/v1/models")} <= operations
    seen = set()

    @given(case=api_schema.as_strategy(generation_mode=mode))
    @settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case):
        seen.add((case.method.upper(), case.path))
        # Negative data must be refused, except in multipart forms, where every field is text and
        # schemathesis's "not a string" (e.g. user=0.0) arrives as a valid string.
        rejects = [] if case.media_type == "multipart/form-data" else [negative_data_rejection]
        case.call_and_validate(checks=CHECKS + rejects, timeout=60)

    call()
    posts = {op for op in operations if op[0] == "POST"}
    assert seen == operations if mode == GenerationMode.POSITIVE else seen >= posts  # (a GET with no
    # parameters has no invalid form)
