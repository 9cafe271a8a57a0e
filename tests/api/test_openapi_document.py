"""``GET /openapi.json`` on the in-process app: every route is in the document with the schemas that validate
it.  The property-based run against a live server is tests/integration/test_openapi.py."""

from __future__ import annotations

import re

from flask.testing import FlaskClient

from api import create_app
from corral.settings import Settings


def test_the_document_lists_every_route_with_its_schemas(client: FlaskClient, settings: Settings) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    app = create_app(settings)
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert method.lower() in doc["paths"].get(path, {}), f"{method} {path} is missing"
    chat = doc["paths"]["/api/chat"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    assert "messages" in doc["components"]["schemas"]["ChatRequest"]["properties"]
    errors = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["default"]["content"]["application/json"]
    assert errors["schema"] == {"$ref": "#/components/schemas/OpenAIError"}
    assert doc["paths"]["/api/tags"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Tags"
    }
    # a job's items are documented by the same models that validate each line
    items = doc["components"]["schemas"]["JobSubmission"]["properties"]["items"]["items"]["anyOf"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in items} == {"GenerateItem", "ChatItem", "EmbedItem", "RerankItem"}
    assert doc["components"]["schemas"]["GenerateItem"]["properties"]["system"]
