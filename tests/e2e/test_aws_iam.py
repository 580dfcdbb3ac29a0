"""--auth aws-iam against a local STS: moto's server mode (PyPI), which implements IAM
CreateRole, STS AssumeRole and GetCallerIdentity. moto does not verify SigV4 signatures (it
names the caller from the access key id alone): tests/unit/test_awsiam.py shows the signature
the client sends is valid over exactly what the exit server checks, and that a tampered server
id or action would not verify at real STS.

What runs for real here: botocore's credential chain and signer in the client, the exit
server's checks, the forwarding to STS over HTTP, the ARN-to-client mapping of the tokens file,
and STS going away."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import botocore.session
import pytest
import pytest_asyncio
from moto.server import ThreadedMotoServer
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from exit_server.server import ExitServer
from exit_server.tokens import new_entry, save_entries
from shared.aio.tls import client_context
from shared.awsiam import encode_envelope
from shared.errors import AuthError
from tunnel_client.awsiam import AwsSigner
from tunnel_client.client import TunnelClient

from .helpers import Certs, RunningClient, client_config, server_config, upstream
from .sec_helpers import echo_app

pytestmark = pytest.mark.asyncio

SERVER_ID = "exit.backhaul.test"
ACCOUNT = "123456789012"


@dataclass
class Sts:
    url: str
    server: ThreadedMotoServer
    roles: dict[str, dict[str, str]]  # role name -> temporary credentials of a session in it

    def use(self, monkeypatch: pytest.MonkeyPatch, role: str) -> None:
        """The environment's credentials are a session of ``role`` (what the ECS agent's
        task-role endpoint would hand the client)."""
        creds = self.roles[role]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["SecretAccessKey"])
        monkeypatch.setenv("AWS_SESSION_TOKEN", creds["SessionToken"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
        for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def sts() -> Iterator[Sts]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}/"
    # moto keeps its accounts in the process, across servers: start from nothing
    urllib.request.urlopen(urllib.request.Request(url + "moto-api/reset", method="POST"), timeout=10).close()
    session = botocore.session.get_session()
    kw: dict[str, Any] = {
        "region_name": "eu-west-1",
        "endpoint_url": url,
        "aws_access_key_id": "AKIAADMIN",
        "aws_secret_access_key": "admin",
    }
    iam = session.create_client("iam", **kw)
    client = session.create_client("sts", **kw)
    roles = {}
    for name in ("backhaul-edge", "someone-else"):
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17"}))["Role"][
            "Arn"
        ]
        roles[name] = client.assume_role(RoleArn=arn, RoleSessionName="task-1")["Credentials"]
    try:
        yield Sts(url, server, roles)
    finally:
        with contextlib.suppress(Exception):
            server.stop()


@dataclass
class IamStack:
    server: ExitServer
    certs: Certs
    sts: Sts
    clients: list[RunningClient]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.public_port}"

    async def add_client(self, upstreams: list[str], *, wait: bool = True, **overrides: Any) -> RunningClient:
        config = client_config(
            self.certs,
            self.server,
            upstreams,
            auth="aws-iam",
            aws_server_id=SERVER_ID,
            aws_sts_endpoint=self.sts.url,
            **overrides,
        )
        client = TunnelClient(config)
        running = RunningClient(client, asyncio.create_task(client.run()))
        self.clients.append(running)
        if wait:
            await client.wait_connected(10)
        return running


@pytest_asyncio.fixture
async def iam_stack(certs: Certs, tmp_path: Path, sts: Sts) -> AsyncIterator[IamStack]:
    path = tmp_path / "tokens.toml"
    edge, _ = new_entry("edge", ["app.test"], [], [f"arn:aws:iam::{ACCOUNT}:role/backhaul-*"], token=False)
    save_entries(path, {"edge": edge})
    server = ExitServer(server_config(certs, tokens=path, aws_server_id=SERVER_ID, aws_sts_endpoint=[sts.url]))
    await server.start()
    s = IamStack(server, certs, sts, [])
    try:
        yield s
    finally:
        for running in s.clients:
            with contextlib.suppress(Exception):
                await running.stop()
        await server.close()


async def get(url: str, host: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Host": host}) as resp:
            return resp.status


async def test_an_allowed_role_registers_and_serves(iam_stack: IamStack, monkeypatch: pytest.MonkeyPatch) -> None:
    iam_stack.sts.use(monkeypatch, "backhaul-edge")
    async with upstream(echo_app()) as up:
        await iam_stack.add_client([f"app.test={up.url}"])
        (tunnel,) = iam_stack.server.registry.tunnels.values()
        assert tunnel.client_id == "edge"
        assert await get(iam_stack.base + "/x", "app.test") == 200


async def test_a_role_not_allowed_is_refused(iam_stack: IamStack, monkeypatch: pytest.MonkeyPatch) -> None:
    iam_stack.sts.use(monkeypatch, "someone-else")
    async with upstream(echo_app()) as up:
        running = await iam_stack.add_client([f"app.test={up.url}"], wait=False, exit_on_auth_failure=True)
        iam_stack.clients.remove(running)  # it ends by itself
        with pytest.raises(BaseException) as info:  # the run's task group wraps it
            await asyncio.wait_for(running.task, 10)
    error = info.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, AuthError) and "AWS identity refused (401)" in str(error)
    assert not iam_stack.server.registry.tunnels
    assert iam_stack.server.control.auth_failures >= 1


async def upgrade_status(stack: IamStack, envelope: str) -> int:
    """The status of a WebSocket upgrade to the control port carrying ``envelope``."""
    url = f"wss://localhost:{stack.server.control_port}"
    try:
        async with connect(url, ssl=client_context(stack.certs.ca), additional_headers={"Backhaul-AWS-IAM": envelope}):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def forged(monkeypatch: pytest.MonkeyPatch, stack: IamStack, **changes: str) -> str:
    """A real signed envelope for ``backhaul-edge`` with some fields changed."""
    stack.sts.use(monkeypatch, "backhaul-edge")
    signer = AwsSigner(changes.pop("sign_endpoint", stack.sts.url), "eu-west-1")
    raw = json.loads(base64.urlsafe_b64decode(signer._sign(changes.pop("server_id", SERVER_ID)) + "=="))
    for key, value in changes.items():
        if key in ("method", "url", "body"):
            raw[key] = value
        else:
            raw["headers"][key] = value
    return encode_envelope(raw["method"], raw["url"], raw["body"], raw["headers"])


@pytest.mark.parametrize(
    "changes",
    [
        {"body": "Action=AssumeRole&Version=2011-06-15"},  # another action
        {"sign_endpoint": "https://sts.amazonaws.com/"},  # another STS endpoint than allowed
        {"url": "http://127.0.0.1:1/"},  # a URL of the caller's choosing
        {"server_id": "other.exit.test"},  # signed for another exit server
        {"X-Amz-Date": "20200101T000000Z"},  # older than --aws-max-age
    ],
    ids=["action", "endpoint", "url", "server-id", "age"],
)
async def test_forged_requests_are_refused_before_sts(
    iam_stack: IamStack, monkeypatch: pytest.MonkeyPatch, changes: dict[str, str]
) -> None:
    verifier = iam_stack.server.control.iam
    assert verifier is not None
    calls = verifier.sts_calls
    assert await upgrade_status(iam_stack, forged(monkeypatch, iam_stack, **changes)) == 401
    assert verifier.sts_calls == calls  # refused by the exit server's own checks
    # and the untouched request is accepted
    assert await upgrade_status(iam_stack, forged(monkeypatch, iam_stack)) == 101


async def test_sts_down_refuses_new_sessions_and_keeps_existing(
    iam_stack: IamStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    iam_stack.sts.use(monkeypatch, "backhaul-edge")
    async with upstream(echo_app()) as up:
        first = await iam_stack.add_client([f"app.test={up.url}"])
        envelope = forged(monkeypatch, iam_stack)
        iam_stack.sts.server.stop()
        # a new signature (the cache holds answers for the same one only)
        await asyncio.sleep(1.1)  # deliberate: x-amz-date has one-second resolution
        fresh = forged(monkeypatch, iam_stack)
        assert fresh != envelope
        assert await upgrade_status(iam_stack, fresh) == 503
        assert first.client.connected
        assert await get(iam_stack.base + "/still", "app.test") == 200


@pytest.mark.parametrize(("role", "ok"), [("backhaul-edge", True), ("someone-else", False)])
async def test_doctor_checks_the_aws_identity(
    iam_stack: IamStack, monkeypatch: pytest.MonkeyPatch, role: str, ok: bool
) -> None:
    from tunnel_client.doctor import diagnose

    iam_stack.sts.use(monkeypatch, role)
    config = client_config(
        iam_stack.certs,
        iam_stack.server,
        ["app.test=http://127.0.0.1:9"],
        auth="aws-iam",
        aws_server_id=SERVER_ID,
        aws_sts_endpoint=iam_stack.sts.url,
    )
    checks = {c.step: c for c in await diagnose(config, "") if c.target.startswith("wss://")}
    assert checks["auth"].failed is not ok
    if not ok:
        assert "AWS identity was refused" in checks["auth"].detail
