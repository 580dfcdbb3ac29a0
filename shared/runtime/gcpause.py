"""The cyclic garbage collector off while a ``run`` process starts, and its start-up objects
frozen once it serves (the performance issue's target 5: start time).

Importing the exit server creates about 94,000 objects that live as long as the process
(modules, functions, classes, pydantic's schemas); the client about 66,000. With the collector
on, the imports trigger about 140 collections, each walking the objects created so far: 27 ms
of the exit server's start and 7 ms of the client's (``bench/startup.py``; docs/BENCHMARKS.md,
round 11). They find almost nothing to free (about 2,000 objects, under 0.3 MiB).

So the console scripts pause the collector for ``run`` (:func:`pause_for_run`, first thing in
each package, before its imports) and :func:`settle` resumes it once the process serves:
``gc.freeze()`` first moves every object alive then into the permanent generation, so no later
collection walks them again (a full collection of them alone took 39 ms), and the few
start-up cycles that are garbage stay allocated instead of costing that walk. A process that
imports the packages (tests, tools) is not affected: only ``exit-server run`` and
``tunnel-client run`` started as commands pause.

Nothing here imports more than ``gc``, ``os`` and ``sys``: it runs before everything else.
"""

from __future__ import annotations

import gc
import os
import sys

__all__ = ["pause_for_run", "paused", "settle"]

_paused = False


def paused() -> bool:
    """True between :func:`pause_for_run` pausing the collector and :func:`settle`."""
    return _paused


def pause_for_run(command: str, argv: list[str] | None = None) -> bool:
    """Pause the collector when this process is ``<command> run`` (``argv``: sys.argv), started
    as the console script of that name; returns whether it paused."""
    global _paused
    args = sys.argv if argv is None else argv
    if _paused or not gc.isenabled() or len(args) < 2 or args[1] != "run":
        return False
    if os.path.basename(args[0]) != command:
        return False
    gc.disable()
    _paused = True
    return True


def settle() -> None:
    """The process serves: freeze what start-up made and turn the collector back on (nothing
    when :func:`pause_for_run` did not pause it)."""
    global _paused
    if not _paused:
        return
    _paused = False
    gc.freeze()
    gc.enable()
