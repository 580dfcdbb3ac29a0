"""`make demo` end to end: the script starts everything, one request passes, all stops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_script_answers_through_the_tunnel() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--once"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Answer (200): Hello from the on-prem container!" in out.stdout
    assert "Public URL:  http://app.localhost:" in out.stdout  # works as printed: *.localhost is loopback
    assert "stopped exit server, tunnel client and upstream" in out.stdout
