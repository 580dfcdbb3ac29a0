"""Validate ECS request documents (``--cli-input-json`` files) against botocore's own ECS model.

botocore ships the ECS API model (the JSON the AWS CLI itself uses), so a document that walks
cleanly through ``RegisterTaskDefinition`` / ``CreateService`` input shapes here has the member
names, types and enum values that the API accepts. ``botocore.validate.ParamValidator`` checks
required members, unknown members, types and minimum lengths/ranges but not enum values nor
maxima, so :class:`ShapeValidator` walks the shapes itself and checks all of those;
:func:`validate_request` runs both and merges their findings.

On top of the model, :func:`external_task_definition_rules` and :func:`external_service_rules`
check the rules of ECS Anywhere (launch type ``EXTERNAL``) that the model cannot express.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any

import botocore.session
from botocore.model import ListShape, MapShape, ServiceModel, Shape, StringShape, StructureShape
from botocore.validate import ParamValidator

__all__ = [
    "OPERATIONS",
    "ShapeValidator",
    "ecs_model",
    "external_service_rules",
    "external_task_definition_rules",
    "validate_request",
]

#: Which ECS operation a document is the input of.
OPERATIONS = {"task-definition": "RegisterTaskDefinition", "service": "CreateService"}

_MODEL: ServiceModel | None = None


def ecs_model() -> ServiceModel:
    """botocore's ECS service model (loaded once)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = botocore.session.get_session().get_service_model("ecs")
    return _MODEL


def _type_name(value: Any) -> str:
    return type(value).__name__


class ShapeValidator:
    """A recursive walk of a value against a botocore shape.

    Checks, at every level: structures are objects with no unknown members (with a "did you
    mean" hint), every required member present, unions with exactly one member set; lists are
    arrays within min/max length, each item checked; maps are objects whose keys and values are
    checked against the key and value shapes; strings are strings within min/max length, one of
    the enum values when the shape has an enum, matching the pattern when it has one; integers
    and longs are integers (not booleans) within min/max; doubles and floats are numbers;
    booleans are booleans; timestamps are ISO 8601 strings or epoch numbers; blobs are strings.
    Each finding is one line: ``path: message``.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.visited: set[str] = set()

    def validate(self, value: Any, shape: Shape, path: str = "") -> list[str]:
        self.errors = []
        self._check(value, shape, path or shape.name)
        return self.errors

    def _error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def _check(self, value: Any, shape: Shape, path: str) -> None:
        self.visited.add(shape.name)
        if value is None:
            self._error(path, f"null is not a valid {shape.type_name} ({shape.name})")
            return
        checker = getattr(self, f"_check_{shape.type_name}", None)
        if checker is None:
            self._error(path, f"unsupported shape type {shape.type_name!r} ({shape.name})")
            return
        checker(value, shape, path)

    # --- containers -------------------------------------------------------------------------

    def _check_structure(self, value: Any, shape: StructureShape, path: str) -> None:
        if not isinstance(value, dict):
            self._error(path, f"expected an object ({shape.name}), got {_type_name(value)}")
            return
        members = shape.members
        for key in value:
            if key not in members:
                hint = difflib.get_close_matches(str(key), list(members), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                self._error(f"{path}.{key}", f"unknown member of {shape.name}{suggestion}")
        for required in shape.required_members:
            if required not in value:
                self._error(path, f"missing required member {required!r} of {shape.name}")
        if shape.metadata.get("union") or getattr(shape, "is_union", False):
            present = [k for k in value if k in members and value[k] is not None]
            if len(present) != 1:
                self._error(path, f"union {shape.name} needs exactly one member, got {present}")
        for key, item in value.items():
            if key in members:
                self._check(item, members[key], f"{path}.{key}")

    def _check_list(self, value: Any, shape: ListShape, path: str) -> None:
        if not isinstance(value, list):
            self._error(path, f"expected an array ({shape.name}), got {_type_name(value)}")
            return
        self._range(len(value), shape, path, "length")
        for index, item in enumerate(value):
            self._check(item, shape.member, f"{path}[{index}]")

    def _check_map(self, value: Any, shape: MapShape, path: str) -> None:
        if not isinstance(value, dict):
            self._error(path, f"expected an object ({shape.name}), got {_type_name(value)}")
            return
        self._range(len(value), shape, path, "size")
        for key, item in value.items():
            self._check(key, shape.key, f"{path}<key {key!r}>")
            self._check(item, shape.value, f"{path}[{key!r}]")

    # --- scalars ----------------------------------------------------------------------------

    def _check_string(self, value: Any, shape: StringShape, path: str) -> None:
        if not isinstance(value, str):
            self._error(path, f"expected a string ({shape.name}), got {_type_name(value)}")
            return
        enum = list(getattr(shape, "enum", None) or shape.metadata.get("enum") or [])
        if enum and value not in enum:
            hint = difflib.get_close_matches(value, enum, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            self._error(path, f"{value!r} is not a valid {shape.name}; valid values: {enum}{suggestion}")
        self._range(len(value), shape, path, "length")
        pattern = shape.metadata.get("pattern")
        if pattern:
            try:
                compiled = re.compile(pattern)
            except re.error:  # a Java-only construct: nothing sound to check with
                compiled = None
            if compiled is not None and compiled.fullmatch(value) is None:
                self._error(path, f"{value!r} does not match pattern {pattern!r}")

    def _check_integer(self, value: Any, shape: Shape, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self._error(path, f"expected an integer ({shape.name}), got {_type_name(value)}")
            return
        self._range(value, shape, path, "value")

    _check_long = _check_integer

    def _check_double(self, value: Any, shape: Shape, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._error(path, f"expected a number ({shape.name}), got {_type_name(value)}")
            return
        self._range(value, shape, path, "value")

    _check_float = _check_double

    def _check_boolean(self, value: Any, shape: Shape, path: str) -> None:
        if not isinstance(value, bool):
            self._error(path, f"expected a boolean ({shape.name}), got {_type_name(value)}")

    def _check_timestamp(self, value: Any, shape: Shape, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self._error(path, f"expected an ISO 8601 string or epoch seconds ({shape.name}), got {_type_name(value)}")

    def _check_blob(self, value: Any, shape: Shape, path: str) -> None:
        if not isinstance(value, str):
            self._error(path, f"expected a (base64) string ({shape.name}), got {_type_name(value)}")

    def _range(self, number: float, shape: Shape, path: str, what: str) -> None:
        low = shape.metadata.get("min")
        high = shape.metadata.get("max")
        if low is not None and number < low:
            self._error(path, f"{what} {number} is below the minimum {low} of {shape.name}")
        if high is not None and number > high:
            self._error(path, f"{what} {number} is above the maximum {high} of {shape.name}")


def validate_request(document: dict[str, Any], operation: str) -> list[str]:
    """All findings for ``document`` as the input of ECS ``operation``: this module's walk plus
    botocore's own ParamValidator (whose report lines are prefixed ``botocore:``)."""
    shape = ecs_model().operation_model(operation).input_shape
    errors = ShapeValidator().validate(document, shape, operation)
    report = ParamValidator().validate(document, shape)
    if report.has_errors():
        errors += [f"botocore: {line.strip()}" for line in report.generate_report().splitlines() if line.strip()]
    return errors


# --- ECS Anywhere rules ---------------------------------------------------------------------

_SECRET_ARN = re.compile(r"^arn:aws[a-z-]*:(ssm:[^:]+:[^:]+:parameter/.+|secretsmanager:[^:]+:[^:]+:secret:.+)$")
_UNSUPPORTED_ON_EXTERNAL_VOLUMES = ("efsVolumeConfiguration", "fsxWindowsFileServerVolumeConfiguration")


def _containers(taskdef: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from taskdef.get("containerDefinitions", [])


def external_task_definition_rules(taskdef: dict[str, Any]) -> list[str]:
    """Rules for a task definition meant for external instances (ECS Anywhere) that the API
    model cannot express, plus the Backhaul sidecar conventions of deploy/ecs."""
    errors: list[str] = []
    if "EXTERNAL" not in taskdef.get("requiresCompatibilities", []):
        errors.append("requiresCompatibilities must include EXTERNAL")
    mode = taskdef.get("networkMode", "bridge")
    if mode == "awsvpc":
        errors.append("networkMode awsvpc is not supported on external instances (use bridge or host)")
    for volume in taskdef.get("volumes", []):
        for key in _UNSUPPORTED_ON_EXTERNAL_VOLUMES:
            if key in volume:
                errors.append(f"volume {volume.get('name')!r}: {key} is not supported on external instances")
    for key in ("inferenceAccelerators", "proxyConfiguration", "ephemeralStorage"):
        if key in taskdef:
            errors.append(f"{key} is not supported on external instances")

    containers = list(_containers(taskdef))
    names = [c.get("name") for c in containers]
    if len(names) != len(set(names)):
        errors.append(f"container names are not unique: {names}")
    volumes = {v.get("name") for v in taskdef.get("volumes", [])}
    uses_secrets = False
    for c in containers:
        where = f"container {c.get('name')!r}"
        if not c.get("memory") and not c.get("memoryReservation") and not taskdef.get("memory"):
            errors.append(f"{where}: needs memory or memoryReservation (or a task-level memory) on EXTERNAL")
        for dep in c.get("dependsOn", []):
            if dep.get("containerName") not in names:
                errors.append(f"{where}: dependsOn unknown container {dep.get('containerName')!r}")
        for link in c.get("links", []):
            if mode != "bridge":
                errors.append(f"{where}: links are only allowed in bridge network mode")
            if link.split(":", 1)[0] not in names:
                errors.append(f"{where}: link to unknown container {link!r}")
        for mount in c.get("mountPoints", []):
            if mount.get("sourceVolume") not in volumes:
                errors.append(f"{where}: mountPoint uses undeclared volume {mount.get('sourceVolume')!r}")
        for secret in c.get("secrets", []):
            uses_secrets = True
            if not _SECRET_ARN.match(secret.get("valueFrom", "")):
                errors.append(
                    f"{where}: secret {secret.get('name')!r} must come from an SSM parameter or Secrets Manager ARN"
                )
        for env in c.get("environment", []):
            if env.get("name") in ("BACKHAUL_TOKEN", "BACKHAUL_ADMIN_TOKEN"):
                errors.append(f"{where}: {env['name']} must come from secrets, not environment")
        if any(arg == "--token" or arg.startswith("--token=") for arg in c.get("command", [])):
            errors.append(f"{where}: the token must never be on the command line")
        if mode == "host" and any(
            p.get("hostPort") not in (None, p.get("containerPort")) for p in c.get("portMappings", [])
        ):
            errors.append(f"{where}: in host mode hostPort must equal containerPort")
        log = c.get("logConfiguration", {})
        if log.get("logDriver") == "awsfirelens" and not any("firelensConfiguration" in o for o in containers):
            errors.append(f"{where}: awsfirelens log driver without a log router (firelensConfiguration) container")
    if uses_secrets and not taskdef.get("executionRoleArn"):
        errors.append("secrets need an executionRoleArn (the agent fetches them with the execution role)")
    routers = [c for c in containers if "firelensConfiguration" in c]
    if len(routers) > 1:
        errors.append("at most one FireLens log router container per task")

    errors += _sidecar_rules(taskdef, containers, mode)
    return errors


def _sidecar_rules(taskdef: dict[str, Any], containers: list[dict[str, Any]], mode: str) -> list[str]:
    """The tunnel-client sidecar: its own health check, started after a healthy app, the
    token from ``secrets``, and an upstream URL the app is reachable at in this network mode."""
    errors: list[str] = []
    clients = [c for c in containers if "tunnel-client" in c.get("command", [])[:1] or c.get("name") == "tunnel-client"]
    if len(clients) != 1:
        return [f"expected exactly one tunnel-client container, found {len(clients)}"]
    client = clients[0]
    hc = " ".join(client.get("healthCheck", {}).get("command", []))
    if "tunnel-client healthcheck" not in hc:
        errors.append("tunnel-client: healthCheck must run `tunnel-client healthcheck`")
    env = {e.get("name"): e.get("value", "") for e in client.get("environment", [])}
    if env.get("BACKHAUL_AUTH") == "aws-iam":  # the task role is the credential: no token at all
        if not taskdef.get("taskRoleArn"):
            errors.append("tunnel-client: --auth aws-iam needs a taskRoleArn (the identity it signs with)")
        if any(s.get("name") == "BACKHAUL_TOKEN" for s in client.get("secrets", [])):
            errors.append("tunnel-client: --auth aws-iam sends no token: drop the BACKHAUL_TOKEN secret")
    elif not any(s.get("name") == "BACKHAUL_TOKEN" for s in client.get("secrets", [])):
        errors.append("tunnel-client: BACKHAUL_TOKEN must be injected from secrets")
    if env.get("BACKHAUL_UPSTREAM_FROM_HOST") == "true":
        return errors + _daemon_rules(taskdef, client, env, mode)
    if not env.get("BACKHAUL_SERVER", "").startswith("wss://"):
        errors.append("tunnel-client: BACKHAUL_SERVER must be a wss:// URL")
    healthy_deps = [d["containerName"] for d in client.get("dependsOn", []) if d.get("condition") == "HEALTHY"]
    if not healthy_deps:
        errors.append("tunnel-client: must dependsOn the app with condition HEALTHY")
    by_name = {c.get("name"): c for c in containers}
    for name in healthy_deps:
        if "healthCheck" not in by_name.get(name, {}):
            errors.append(f"tunnel-client: depends on {name!r} being HEALTHY but {name!r} has no healthCheck")
    if (client.get("stopTimeout") or 30) <= 30:
        errors.append("tunnel-client: stopTimeout must exceed the 30 s drain timeout")
    upstreams = [u for u in env.get("BACKHAUL_UPSTREAM", "").split(",") if u.strip()]
    if not upstreams:
        errors.append("tunnel-client: BACKHAUL_UPSTREAM is empty")
    links = {link.split(":", 1)[-1] for link in client.get("links", [])}
    for spec in upstreams:
        url = spec.partition("=")[2]
        host = re.sub(r"^https?://", "", url).split("/", 1)[0].rsplit(":", 1)[0]
        if mode == "bridge" and host not in links:
            errors.append(f"tunnel-client: in bridge mode upstream {url!r} must use a links alias ({sorted(links)})")
        if mode == "host" and host not in ("127.0.0.1", "localhost", "[::1]"):
            errors.append(f"tunnel-client: in host mode upstream {url!r} must be on 127.0.0.1")
    return errors


def _daemon_rules(taskdef: dict[str, Any], client: dict[str, Any], env: dict[str, str], mode: str) -> list[str]:
    """Daemon mode: host networking (the agent's introspection API listens on the host's
    127.0.0.1:51678), Docker's socket mounted read-only, a drain longer than the stop timeout."""
    errors: list[str] = []
    if mode != "host":
        errors.append("daemon mode: networkMode must be host (the ECS agent API is on the host's loopback)")
    if not env.get("BACKHAUL_SERVER", "").startswith("wss://"):
        errors.append("tunnel-client: BACKHAUL_SERVER must be a wss:// URL")
    sockets = {
        v.get("name")
        for v in taskdef.get("volumes", [])
        if v.get("host", {}).get("sourcePath") == "/var/run/docker.sock"
    }
    mounted = [m for m in client.get("mountPoints", []) if m.get("sourceVolume") in sockets]
    if not mounted or not all(m.get("readOnly") for m in mounted):
        errors.append("daemon mode: mount /var/run/docker.sock read-only")
    if (client.get("stopTimeout") or 30) <= 30:
        errors.append("tunnel-client: stopTimeout must exceed the 30 s drain timeout")
    return errors


def external_service_rules(service: dict[str, Any]) -> list[str]:
    """Rules for a service on external instances: launch type EXTERNAL, and none of the
    features that need an AWS-managed network (load balancers, awsvpc, Cloud Map, Service
    Connect, capacity providers)."""
    errors: list[str] = []
    if service.get("launchType") != "EXTERNAL":
        errors.append(f"launchType must be EXTERNAL, got {service.get('launchType')!r}")
    for key, why in (
        ("loadBalancers", "load balancers are not supported for EXTERNAL services"),
        ("networkConfiguration", "awsvpc network configuration is not supported for EXTERNAL services"),
        ("serviceRegistries", "service discovery is not supported for EXTERNAL services"),
        ("serviceConnectConfiguration", "Service Connect is not supported for EXTERNAL services"),
        ("capacityProviderStrategy", "capacity providers cannot be combined with launchType EXTERNAL"),
        ("platformVersion", "platformVersion applies to Fargate only"),
        ("healthCheckGracePeriodSeconds", "healthCheckGracePeriodSeconds needs a load balancer"),
    ):
        if service.get(key):
            errors.append(f"{key}: {why}")
    return errors
