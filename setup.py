"""The optional compiled build (README, "Compiled build"): everything else is in pyproject.toml.

By default this adds nothing: ``pip install .`` builds the pure-Python package. With
``BACKHAUL_COMPILE=1`` it compiles :data:`COMPILED` with mypyc (mypy's compiler) into C
extensions beside the pure modules, which then take precedence on import. That needs mypy, the
runtime dependencies (mypyc type-checks the modules against them, as ``mypy --strict`` does)
and a C compiler in the build environment, so it runs without build isolation::

    pip install mypy 'setuptools>=77' .     # the runtime dependencies; or a `make test` virtualenv
    BACKHAUL_COMPILE=1 pip wheel --no-build-isolation --no-deps --wheel-dir dist .

``scripts/compiled.py DIR`` builds the same extensions in a copy of the working tree, for the
compiled test pass of ``make test`` and for ``bench/ab.py --b-dir``.
"""

from __future__ import annotations

import os
import sys

#: The modules the compiled build compiles: the sans-I/O core and everything a request runs
#: through. Left out: shared/errors.py (a stream re-raises a copy of a stored error made
#: through its ``__dict__``, which a compiled exception has not; errors are off the hot path),
#: shared/aio/wsfast.py (its classes are subclassed by interpreted ones, with websockets'
#: classes as the other base; its frame loops are in wsframes.py, compiled), and everything
#: that runs once (commands, settings, start).
#: Tried and left out (docs/BENCHMARKS.md, round 18): shared/h2map.py (h2's error-code enum),
#: exit_server/limits.py (an async generator), access.py and routes.py (called with duck-typed
#: stand-ins that a compiled signature refuses; httpguard.py takes a Protocol for that).
COMPILED = (
    "shared/sizes.py",
    "shared/frames.py",
    "shared/heads.py",
    "shared/events.py",
    "shared/mux.py",
    "shared/h1server.py",
    "shared/httputil.py",
    "shared/forwarding.py",
    "shared/routing.py",
    "shared/runtime/plainmetrics.py",
    "shared/runtime/textsafe.py",
    "shared/runtime/accesslog.py",
    "shared/aio/connection.py",
    "shared/aio/splice.py",
    "shared/aio/wsframes.py",
    "exit_server/headers.py",
    "exit_server/observe.py",
    "exit_server/public.py",
    "exit_server/h1.py",
    "exit_server/httpguard.py",
    "tunnel_client/guard.py",
    "tunnel_client/http1.py",
    "tunnel_client/upstream.py",
    "tunnel_client/audit.py",
)


def _extensions() -> list[object]:
    flag = os.environ.get("BACKHAUL_COMPILE", "")
    if flag in ("", "0"):
        return []
    if flag != "1":
        sys.exit(f"BACKHAUL_COMPILE={flag!r}: use 1 (compile) or 0 / unset (pure Python)")
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit(
            "BACKHAUL_COMPILE=1 needs mypy (with mypyc) in the build environment: "
            "pip install mypy, then build with --no-build-isolation"
        )
    # group_name: one shared runtime library named after the project, not after a hash.
    return list(
        mypycify(
            ["--strict", "--namespace-packages", "--explicit-package-bases", *COMPILED],
            opt_level="3",
            group_name="backhaul",
        )
    )


if __name__ == "__main__":
    from setuptools import setup

    setup(ext_modules=_extensions())
