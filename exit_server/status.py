"""``exit-server status``: the tunnel table from the admin API."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

__all__ = ["format_table", "print_status"]


def _token(path: Path | None) -> str:
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--admin-token-file: cannot read {path}: {exc.strerror}") from None
    token = os.environ.get("BACKHAUL_ADMIN_TOKEN", "").strip()
    if not token:
        raise ConfigError("an admin token is required: --admin-token-file FILE or BACKHAUL_ADMIN_TOKEN")
    return token


def format_table(tunnels: list[dict[str, Any]]) -> str:
    """Render tunnels as an aligned text table."""
    header = ["TUNNEL", "CLIENT", "HOSTNAMES", "REMOTE", "SINCE", "STREAMS", "REQUESTS", "LABELS"]
    rows = [header]
    for t in tunnels:
        names = ", ".join(t["hostnames"] + [f"tcp:{p}" for p in t.get("tcp_ports", [])])
        labels = " ".join(f"{k}={v}" for k, v in sorted(t["labels"].items()) if k != "ecs.task_arn")
        rows.append(
            [
                t["id"],
                t["client_id"],
                names or "-",
                t["remote_addr"],
                t["connected_since"],
                str(t["streams_in_flight"]),
                str(t["requests"]),
                labels or "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def print_status(admin_addr: str | None, token_file: Path | None, as_json: bool) -> int:
    """Fetch /api/tunnels and print it; exit 1 when the API cannot be reached."""
    addr = admin_addr or os.environ.get("BACKHAUL_ADMIN_ADDR") or "127.0.0.1:8690"
    request = urllib.request.Request(
        f"http://{addr}/api/tunnels", headers={"Authorization": f"Bearer {_token(token_file)}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 (operator-given admin address)
            data = json.load(resp)
    except urllib.error.HTTPError as exc:
        print(f"exit-server: error: admin API answered {exc.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(
            f"exit-server: error: cannot reach the admin API at {addr}: {getattr(exc, 'reason', exc)}", file=sys.stderr
        )
        return 1
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print(format_table(data["tunnels"]))
    return 0
