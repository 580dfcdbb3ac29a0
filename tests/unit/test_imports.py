"""shared/ is sans-I/O: its protocol modules import no I/O library (STYLE.md section 2).

Each check runs in a fresh interpreter (``python -I``), so nothing this test process already
imported (pytest pulls in asyncio) can hide or fake an import.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

#: shared/'s top level is the wire protocol and the HTTP rules both sides apply; process
#: plumbing lives in shared/runtime/ and the asyncio adapters in shared/aio/.
SANS_IO = [
    "errors",
    "frames",
    "heads",
    "messages",
    "events",
    "mux",
    "sizes",
    "routing",
    "httputil",
    "forwarding",
    "challenge",
    "h2map",
    "awsiam",
    "h1server",
]
TOP_LEVEL = {*SANS_IO, "proxyproto"}
FORBIDDEN = ["asyncio", "websockets", "aiohttp", "socket"]
SHARED = Path(__file__).resolve().parents[2] / "shared"

#: Imports the named modules, recording which module first imported each forbidden one.
PROBE = """
import json, sys

FORBIDDEN = {forbidden!r}
first = {{}}

class Recorder:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in FORBIDDEN and top not in first:
            frame = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename.startswith("<frozen importlib")
                or frame.f_globals.get("__name__", "").startswith("importlib")
            ):
                frame = frame.f_back
            first[top] = frame.f_globals.get("__name__", "?") if frame is not None else "?"
        return None

sys.meta_path.insert(0, Recorder())
for module in {modules!r}:
    __import__("shared." + module)
print(json.dumps({{"loaded": sorted(m for m in FORBIDDEN if m in sys.modules), "importers": first}}))
"""


def probe(modules: list[str]) -> tuple[set[str], dict[str, str]]:
    """(forbidden modules loaded, the module that first imported each) after importing
    ``shared.<module>`` for each of ``modules`` in a fresh interpreter."""
    code = PROBE.format(forbidden=FORBIDDEN, modules=modules)
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    data = json.loads(result.stdout)
    return set(data["loaded"]), dict(data["importers"])


@pytest.mark.parametrize(
    "module", ["errors", "frames", "heads", "sizes", "routing", "httputil", "h2map", "h1server", "runtime.backoff"]
)
def test_pure_modules_load_no_io_library_at_all(module: str) -> None:
    assert probe([module])[0] == set()


@pytest.mark.parametrize("module", ["messages", "events", "mux"])
def test_protocol_modules_load_no_event_loop_or_websocket_library(module: str) -> None:
    loaded, _ = probe([module])
    assert not {"asyncio", "websockets", "aiohttp"} & loaded


def test_no_shared_module_imports_an_io_library() -> None:
    """pydantic pulls in ``socket`` (importlib.metadata -> email.utils) and pydantic-settings
    pulls in ``asyncio``; those are third-party transitive imports. None may come from shared.
    Every top-level module is loaded, not only the protocol core."""
    loaded, importers = probe(sorted(set(SANS_IO) | {p.stem for p in SHARED.glob("*.py")}))
    assert not {"websockets", "aiohttp"} & loaded
    for name in loaded:
        assert not importers[name].startswith("shared"), f"{importers[name]} imports {name}"


def test_recorder_catches_a_direct_import(tmp_path: Path) -> None:
    """The probe itself works: a module that imports socket is named as the importer."""
    code = PROBE.format(forbidden=FORBIDDEN, modules=[]).replace("print(json.dumps", "import canary\nprint(json.dumps")
    (tmp_path / "canary.py").write_text("import socket\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(result.stdout)["importers"]["socket"] == "canary"


@pytest.mark.parametrize("path", sorted(SHARED.glob("*.py")), ids=lambda p: p.name)
def test_no_io_import_statement_in_shared(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.partition(".")[0] not in FORBIDDEN, f"{path.name}:{node.lineno} imports {name}"


def test_every_sans_io_module_is_checked() -> None:
    """And nothing else sits at shared/'s top level: it reads as the protocol."""
    assert {p.stem for p in SHARED.glob("*.py")} == TOP_LEVEL


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("tunnel_client.client", ["aiohttp", "h2", "hpack", "botocore", "prometheus_client"]),
        (
            "exit_server.server",
            ["h2", "hpack", "botocore", "websockets.asyncio.client", "python_socks", "prometheus_client", "aiohttp"],
        ),
        ("exit_server.__main__", ["aiohttp", "yarl"]),
    ],
)
def test_optional_libraries_load_only_when_used(module: str, absent: list[str]) -> None:
    """Start time: HTTP/2 (h2) loads with the first HTTP/2 listener or upstream, botocore only
    with --auth aws-iam, aiohttp in the client only for health checks or ECS metadata and in the
    exit server only for the fleet's relays and IAM's STS calls (its listeners are exit_server/h1.py),
    prometheus_client in either process only at the first scrape of its /metrics; websockets' client
    (and python-socks with it) never in the exit server (shared/aio/wsclient.py)."""
    code = f"import sys, {module}; print([m for m in {absent!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
