"""Schemathesis over the service's own OpenAPI schema: generated requests, valid and invalid, against a real
server; no response may be a 5xx, and every response must match what the schema declares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from service.app import create_app
from service.routes.caption import BATCH_PATH
from service.settings import Settings
from tests.test_service import Server, running_server, tiny_engine_fixture  # noqa: F401  (the tiny_engine fixture)

# The schema does not depend on the model, so it is read from an app that never starts.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
OPERATIONS = [(method.upper(), path, operation) for path, methods in SCHEMA.raw_schema["paths"].items()
              for method, operation in methods.items()]
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode}")
    for method, path, operation in OPERATIONS
    # negative cases need something to get wrong: parameters, a body or credentials
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or {"parameters", "requestBody", "security"} & set(operation)
]


def _every_image_refused(response) -> bool:
    """A POST /caption/batch answer in which no image got a caption."""
    return response.status_code == 200 and response.json()["captioned"] == 0


@pytest.fixture(scope="module")
def api_server(tiny_engine) -> Iterator[Server]:
    settings = Settings(admin_token="schema-test", max_wait_ms=0, log_level="warning")
    with running_server(settings, tiny_engine) as running:
        yield running


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_api_conforms_to_its_schema(api_server: Server, method: str, path: str, mode: GenerationMode) -> None:
    @given(case=SCHEMA[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        # A schema-valid upload may still not be an image (415/422): the schema cannot say "a decodable image".
        excluded = [positive_data_acceptance]
        response = case.call(base_url=api_server.url)
        if case.path == BATCH_PATH and _every_image_refused(response):
            # A file part is bytes whatever schemathesis put in it, so "invalid" image content is an image that
            # cannot be read, which POST /caption/batch refuses in that image's result, with a 200
            excluded.append(negative_data_rejection)
        case.validate_response(response, excluded_checks=excluded)

    check()
