"""aws_roles in the tokens file: parsing, writing, CLI and the role lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from exit_server.tokens import TokenRegistry, load_entries, new_entry, save_entries
from shared.errors import ConfigError

ARN = "arn:aws:sts::123456789012:assumed-role/backhaul-edge/task-1"


def test_iam_only_client_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    entry, token = new_entry("edge", ["app.test"], [], ["arn:aws:iam::123456789012:role/backhaul-*"], token=False)
    assert token == "" and not entry.has_token
    both, token2 = new_entry("both", ["b.test"], [], ["arn:aws:iam::123456789012:role/other"])
    assert token2.startswith("bh_")
    save_entries(path, {"edge": entry, "both": both})
    text = path.read_text()
    assert 'aws_roles = ["arn:aws:iam::123456789012:role/backhaul-*"]' in text
    loaded = load_entries(path)
    assert loaded["edge"].aws_roles == entry.aws_roles and not loaded["edge"].has_token
    registry = TokenRegistry(path)
    principal = registry.for_role(ARN)
    assert principal is not None and principal.client_id == "edge" and principal.hosts == ("app.test",)
    assert registry.for_role("arn:aws:sts::123456789012:assumed-role/intruder/x") is None


def test_ambiguous_roles_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.toml"
    a, _ = new_entry("a", ["a.test"], [], ["arn:aws:iam::123456789012:role/backhaul-*"], token=False)
    b, _ = new_entry("b", ["b.test"], [], ["arn:aws:iam::123456789012:role/*-edge"], token=False)
    save_entries(path, {"a": a, "b": b})
    assert TokenRegistry(path).for_role(ARN) is None
    assert "several clients (a, b)" in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        'aws_roles = ["not-an-arn"]\nhosts = ["a.test"]',
        'aws_roles = []\nhosts = ["a.test"]',  # neither a token nor a role
        'aws_roles = "arn:aws:iam::1:role/x"\nhosts = ["a.test"]',
    ],
)
def test_bad_entries(tmp_path: Path, body: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(f"[clients.x]\n{body}\n")
    with pytest.raises(ConfigError):
        load_entries(path)


def test_revoked_role_client_does_not_authenticate(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    entry, _ = new_entry("edge", ["app.test"], [], ["arn:aws:iam::123456789012:role/backhaul-edge"], token=False)
    entry.revoked = True
    save_entries(path, {"edge": entry})
    assert TokenRegistry(path).for_role(ARN) is None


def test_token_cli_adds_an_iam_client_without_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exit_server.__main__ import main

    path = tmp_path / "tokens.toml"
    role = "arn:aws:iam::123456789012:role/backhaul-*"
    assert (
        main(["token", "add", "--tokens", str(path), "--client", "edge", "--aws-role", role, "--host", "a.test"]) == 0
    )
    out = capsys.readouterr()
    assert out.out == "" and "no token" in out.err
    assert main(["token", "list", "--tokens", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "token_id=-" in listed and f"aws_roles={role}" in listed
    with pytest.raises(SystemExit) as exited:
        main(["token", "rotate", "--tokens", str(path), "--client", "edge"])
    assert exited.value.code == 2 and "AWS IAM only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["token", "add", "--tokens", str(path), "--client", "x", "--aws-role", "nope", "--host", "b.test"])
    assert exited.value.code == 2 and "--aws-role: bad IAM role pattern" in capsys.readouterr().err
