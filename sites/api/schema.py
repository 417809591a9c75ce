"""How the API's two kinds of credentials appear in the OpenAPI schema.

drf-spectacular finds these extensions by subclassing; ``sites.api.views`` imports this module
so that they are registered before a schema is generated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension

from client_agent.signing import HEADER_SIGNATURE

if TYPE_CHECKING:
    from drf_spectacular.openapi import AutoSchema


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "sites.authentication.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A person's API token (`fpt_…`), made at POST /api/v1/api-tokens/.",
        }


class SiteSignatureScheme(OpenApiAuthenticationExtension):
    target_class = "sites.authentication.SiteSignatureAuthentication"
    name = "siteSignature"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": HEADER_SIGNATURE,
            "description": "A site agent's signed request: the X-FedPortal-Cert-Fingerprint, "
            "-Timestamp, -Nonce and -Signature headers made by "
            "client_agent.signing.sign_request with the site's key.",
        }
