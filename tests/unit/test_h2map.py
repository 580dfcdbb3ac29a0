"""shared.h2map: HTTP/2 semantics on the tunnel, without sockets."""

from __future__ import annotations

import pytest

from shared.frames import ResetCode
from shared.h2map import (
    H2Error,
    from_h2_reset,
    grpc_status_headers,
    grpc_timeout,
    is_grpc,
    split_pseudo,
    to_h2_reset,
    wants_trailers,
)


@pytest.mark.parametrize("code", [0, 1, 2, 7, 8, 0xB, 0xD, 0xFF])
def test_h2_codes_round_trip_on_version_2(code: int) -> None:
    assert to_h2_reset(from_h2_reset(code, carries_h2=True)) == code


@pytest.mark.parametrize(
    ("h2code", "v1"),
    [(H2Error.CANCEL, ResetCode.CANCEL), (H2Error.REFUSED_STREAM, ResetCode.REFUSED), (0xD, ResetCode.UPSTREAM_RESET)],
)
def test_h2_codes_on_version_1_map_to_the_nearest(h2code: int, v1: int) -> None:
    assert from_h2_reset(h2code, carries_h2=False) == v1


@pytest.mark.parametrize(
    ("tunnel", "h2code"),
    [
        (ResetCode.CANCEL, H2Error.CANCEL),
        (ResetCode.REFUSED, H2Error.REFUSED_STREAM),
        (ResetCode.UPSTREAM_RESET, H2Error.INTERNAL_ERROR),
        (ResetCode.TOO_LARGE, H2Error.INTERNAL_ERROR),
        (999, H2Error.INTERNAL_ERROR),
    ],
)
def test_tunnel_codes_to_h2(tunnel: int, h2code: int) -> None:
    assert to_h2_reset(tunnel) == h2code


def test_split_pseudo() -> None:
    pseudo, regular = split_pseudo([(b":method", b"GET"), (b":path", b"/\xe9"), (b"x-a", b"1"), (b"x-a", b"2")])
    assert pseudo == {":method": "GET", ":path": "/\xe9"}
    assert regular == [("x-a", "1"), ("x-a", "2")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1S", 1.0),
        ("500m", 0.5),
        ("2M", 120.0),
        ("1H", 3600.0),
        ("100u", 1e-4),
        ("99999999n", 0.099999999),
        ("123456789S", None),  # more than 8 digits
        ("10x", None),
        ("S", None),
        ("-1S", None),
        ("１S", None),  # not ASCII digits
    ],
)
def test_grpc_timeout(value: str, expected: float | None) -> None:
    got = grpc_timeout([("Grpc-Timeout", value)])
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_grpc_detection_and_trailers_wanted() -> None:
    assert is_grpc([("content-type", "application/grpc+proto")])
    assert not is_grpc([("content-type", "application/json")])
    assert wants_trailers([("TE", "trailers")])
    assert wants_trailers([("content-type", "application/grpc")])
    assert not wants_trailers([("te", "gzip")])


def test_grpc_message_is_percent_encoded() -> None:
    fields = dict(grpc_status_headers(14, "héllo 100% \n"))
    assert fields == {"content-type": "application/grpc", "grpc-status": "14", "grpc-message": "h%C3%A9llo 100%25 %0A"}
