"""Build the compiled variant (README, "Compiled build") in a copy of the working tree.

    .venv/bin/python scripts/compiled.py DIR

Copies the files git knows in this checkout (tracked, and new files not ignored, as they are on
disk: uncommitted edits included) into DIR, builds the compiled wheel there exactly as the
container image does (``BACKHAUL_COMPILE=1 pip wheel --no-build-isolation``, with the mypyc of
the running interpreter's environment, which ``make test`` installs), and replaces DIR's
packages with the wheel's contents: DIR is then the checkout with the packages a compiled
install has. ``cd DIR && BACKHAUL_EXPECT_COMPILED=1 PYTHONPATH=$PWD python -m pytest ...``
tests the compiled build, and ``bench/ab.py REV --b-dir DIR`` measures it. The working tree
itself never gets an extension module: one left beside a source file would shadow every later
edit of it. The wheel stays in DIR/wheel.

DIR is replaced when it holds an earlier build of this script, and refused otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = ".backhaul-compiled"


def copy_tree(dest: Path) -> int:
    """Copy the checkout's files into ``dest`` (new, but for the marker file); returns their count."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    count = 0
    for raw in listed:
        if not raw:
            continue
        name = os.fsdecode(raw)
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree, not yet committed
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        count += 1
    return count


PACKAGES = ("shared", "exit_server", "tunnel_client")


def build(dest: Path) -> Path:
    """Build the compiled wheel from ``dest`` into ``dest/wheel``; returns the wheel."""
    env = dict(os.environ, BACKHAUL_COMPILE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
    done = subprocess.run(
        [*command, "--wheel-dir", str(dest / "wheel"), str(dest)],
        cwd=dest,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-6000:] + done.stderr[-6000:])
        raise SystemExit(f"compiled build failed in {dest} (status {done.returncode})")
    (wheel,) = (dest / "wheel").glob("backhaul-*.whl")
    return wheel


def unpack(wheel: Path, dest: Path) -> list[str]:
    """Replace ``dest``'s packages with the wheel's; returns the extension modules' names."""
    for package in PACKAGES:
        shutil.rmtree(dest / package)
    # The build's leftovers: the egg-info would make DIR on PYTHONPATH look like an installed
    # backhaul to pip (tests/deploy/test_dist.py's fresh install would then skip the wheel).
    for leftover in ("build", "backhaul.egg-info"):
        shutil.rmtree(dest / leftover, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if ".dist-info/" not in name]
        archive.extractall(dest, members=names)
    return sorted(name for name in names if name.endswith(".so"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="where to copy and build")
    args = parser.parse_args(argv)
    dest: Path = args.dir.resolve()
    if dest == ROOT or (ROOT in dest.parents and ROOT / "build" not in dest.parents):
        parser.error(f"{dest}: inside the checkout; use a directory outside it or under its build/")
    if dest.exists():
        if not (dest / MARK).exists():
            parser.error(f"{dest} exists and is not an earlier compiled build: remove it first")
        shutil.rmtree(dest)
    try:
        import mypyc  # noqa: F401
    except ImportError:
        parser.error("mypy (with mypyc) is not installed here: `make test` installs it")
    dest.mkdir(parents=True)
    (dest / MARK).write_text("made by scripts/compiled.py; replaced by its next run\n")
    files = copy_tree(dest)
    built = unpack(build(dest), dest)
    print(f"copied {files} files to {dest}; installed its compiled wheel there: {len(built)} extension modules")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
