"""tests/ports.py: the ports tests name before binding stay out of the kernel's own picks."""

from __future__ import annotations

from pathlib import Path

from tests.ports import FLOOR, free_port, free_port_run, outside_ephemeral


def test_the_span_is_the_wider_side_of_the_ephemeral_range(tmp_path: Path) -> None:
    source = tmp_path / "range"
    source.write_text("32768\t60999\n")
    assert outside_ephemeral(source) == (FLOOR, 32767)
    source.write_text("1024 20000\n")
    assert outside_ephemeral(source) == (20001, 65535)
    source.write_text("1024 65000\n")
    assert outside_ephemeral(source) is None  # nothing wide enough: the kernel's choice
    assert outside_ephemeral(tmp_path / "missing") == (FLOOR, 32767)  # Linux's default


def test_ports_are_outside_the_range_and_never_handed_out_twice() -> None:
    span = outside_ephemeral()
    ports = [free_port() for _ in range(50)]
    base = free_port_run(5)
    run = list(range(base, base + 5))
    assert len(set(ports + run)) == 55
    if span is not None:
        assert all(span[0] <= p <= span[1] for p in ports + run)
