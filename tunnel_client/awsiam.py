"""AWS IAM authentication, the client's side (``--auth aws-iam``; docs/PROTOCOL.md 5.3): sign an
``sts:GetCallerIdentity`` request with the credentials botocore finds the usual way (the ECS
task-role endpoint, an SSM-managed instance role, the environment, a profile), bound to one
exit server by a signed ``X-Backhaul-Server-ID`` header. Nothing is sent to AWS from here: the
exit server forwards the signed request to STS. botocore is the ``aws`` extra, imported only
when this mode is used.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shared.awsiam import BODY, SERVER_ID_HEADER, encode_envelope
from shared.errors import ConfigError

__all__ = ["AwsSigner", "require_botocore"]

GLOBAL_ENDPOINT = "https://sts.amazonaws.com/"


def require_botocore() -> None:
    """Raises ConfigError when the ``aws`` extra is not installed."""
    try:
        import botocore.session  # noqa: F401
    except ImportError:
        raise ConfigError("--auth aws-iam needs botocore: pip install 'backhaul[aws]'") from None


class AwsSigner:
    """Signs one envelope per connection attempt (credentials are refreshed by botocore)."""

    def __init__(self, endpoint: str | None = None, region: str | None = None) -> None:
        import botocore.session

        self._session: Any = botocore.session.get_session()
        self.region = region or self._session.get_config_variable("region")
        if endpoint is not None:
            self.endpoint = endpoint if endpoint.endswith("/") else endpoint + "/"
            self.signing_region = self.region or "us-east-1"
        elif self.region:
            self.endpoint = f"https://sts.{self.region}.amazonaws.com/"
            self.signing_region = self.region
        else:
            self.endpoint = GLOBAL_ENDPOINT
            self.signing_region = "us-east-1"

    async def envelope(self, server_id: str) -> str:
        """The ``Backhaul-AWS-IAM`` header value (credential lookup may block: a thread).

        Raises:
            RuntimeError: no credentials found.
        """
        return await asyncio.to_thread(self._sign, server_id)

    def _sign(self, server_id: str) -> str:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        credentials = self._session.get_credentials()
        if credentials is None:
            raise RuntimeError("no AWS credentials found (task role, instance role, environment or profile)")
        request = AWSRequest(
            method="POST",
            url=self.endpoint,
            data=BODY,
            headers={
                "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
                SERVER_ID_HEADER: server_id,
            },
        )
        SigV4Auth(credentials.get_frozen_credentials(), "sts", self.signing_region).add_auth(request)
        return encode_envelope("POST", self.endpoint, BODY, {k: str(v) for k, v in request.headers.items()})
