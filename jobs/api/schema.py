"""How the jobs API's streamed-upload credential appears in the OpenAPI schema.

drf-spectacular finds extensions by subclassing; ``jobs.api.views`` imports this module so that
it is registered before a schema is generated. (The people and plain agent schemes are
registered by ``sites.api.schema``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension

from client_agent.signing import HEADER_SIGNATURE
from jobs.api.authentication import HEADER_CONTENT_SHA256

if TYPE_CHECKING:
    from drf_spectacular.openapi import AutoSchema


class StreamedBodySignatureScheme(OpenApiAuthenticationExtension):
    target_class = "jobs.api.authentication.StreamedBodySignatureAuthentication"
    name = "siteSignatureStreamedBody"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": HEADER_SIGNATURE,
            "description": "A site agent's signed request (client_agent.signing.sign_request) "
            f"whose body digest is also sent as {HEADER_CONTENT_SHA256}: the portal verifies "
            "the signature over that digest and the body against it as it streams to storage.",
        }
