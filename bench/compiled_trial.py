"""A trial build of the hot path compiled with mypyc, for ``bench/ab.py --b-dir``: not how
Backhaul is built or shipped (docs/BENCHMARKS.md, round 16, says what landing it takes).

    .venv/bin/python bench/compiled_trial.py DIR [--rev HEAD] [--all]
    .venv/bin/python bench/ab.py HEAD --b-dir DIR --workload small50,small1 --duration 3 --rounds 6

Clones REV into DIR, makes the source edits mypyc needs in these modules (it rejects
``Final`` fields of a dataclass at run time; for commits before 2026-12-05 also: it cannot
resolve a bare ``memoryview`` in a NamedTuple, and enforces the ``frozenset`` mypy infers for
``frozenset & dict.keys()``, which is a ``set`` at run time), and compiles :data:`MODULES`
in place with the ``mypyc`` of the project's virtualenv (mypy's own, already a test
dependency). Needs a C compiler and the Python headers. Every load stays in
``bench/ab.py``: this only builds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The sans-I/O core and the per-request modules. Left out: shared/aio/wsfast.py (its classes
#: are subclassed by interpreted ones, with websockets' classes as the other base).
MODULES = (
    "shared/errors.py",
    "shared/sizes.py",
    "shared/frames.py",
    "shared/heads.py",
    "shared/events.py",
    "shared/mux.py",
    "shared/h1server.py",
    "shared/httputil.py",
    "shared/forwarding.py",
    "shared/aio/connection.py",
    "exit_server/headers.py",
    "exit_server/observe.py",
    "exit_server/public.py",
    "tunnel_client/guard.py",
    "tunnel_client/http1.py",
)

#: With ``--all``: also the public listener and the client's forwarder, for a ``--rev`` from
#: 460357e on (before, each had an async generator, which mypyc does not compile).
MORE = ("exit_server/h1.py", "tunnel_client/upstream.py")

_FINAL_FIELD = re.compile(r"^(    [a-z_]+): Final\[(.*)\]((?: = .*)?(?:  #.*)?)$", re.MULTILINE)


def edit(tree: Path, modules: tuple[str, ...]) -> None:
    """The source edits the compiled modules need (a trial: read-only fields become plain)."""
    for name in modules:
        path = tree / name
        text = _FINAL_FIELD.sub(r"\1: \2\3", path.read_text())
        text = text.replace("    payload: memoryview\n", "    payload: builtins.memoryview\n")
        if "builtins.memoryview" in text and "import builtins\n" not in text:
            text = text.replace("import enum\n", "import builtins\nimport enum\n")
        text = text.replace(
            "if _PEER_FIELDS & request.headers.keys():", "if not _PEER_FIELDS.isdisjoint(request.headers.keys()):"
        )
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="where to clone and build (must not exist)")
    parser.add_argument("--rev", default="HEAD", help="the commit to build (default HEAD)")
    parser.add_argument("--all", action="store_true", help="also " + " and ".join(MORE))
    args = parser.parse_args(argv)
    modules = MODULES + MORE if args.all else MODULES
    tree: Path = args.dir.resolve()
    if tree.exists():
        parser.error(f"{tree} exists")
    mypyc = Path(sys.executable).parent / "mypyc"
    if not mypyc.exists():
        parser.error(f"{mypyc} not found: `make test` installs mypy (with mypyc) once")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(tree)], check=True)
    subprocess.run(["git", "-C", str(tree), "checkout", "-q", "--detach", args.rev], check=True)
    edit(tree, modules)
    # mypyc's setuptools run reads pyproject.toml and would build the whole project: moved away.
    (tree / "pyproject.toml").rename(tree / "pyproject.toml.trial")
    env = dict(os.environ, MYPYPATH=str(tree))
    cmd = [str(mypyc), "--strict", "--namespace-packages", "--explicit-package-bases", *modules]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    (tree / "pyproject.toml.trial").rename(tree / "pyproject.toml")
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        return 1
    built = sorted(str(p.relative_to(tree)) for p in tree.rglob("*.so") if "build" not in p.parts)
    print(f"compiled {len(built) - 1} modules (and mypyc's runtime library) in {tree}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
