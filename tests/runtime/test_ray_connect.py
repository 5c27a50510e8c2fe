"""How the gateway joins a Ray cluster: the auth mode it picks and its one-line errors (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambdascale.runtime.ray_connect import RayConnectError, choose_auth_mode, connect, token_source
from tests.multihost.netns import free_port


def test_token_mode_exactly_where_a_token_is_available(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert choose_auth_mode({}, home) is None and token_source({}, home) is None
    (home / ".ray" / "auth_token").write_text("t" * 32)
    assert choose_auth_mode({}, home) == "token"
    assert token_source({}, home) == str(home / ".ray" / "auth_token")
    # the operator's setting wins, both ways
    assert choose_auth_mode({"RAY_AUTH_MODE": "disabled"}, home) == "disabled"
    assert choose_auth_mode({"RAY_AUTH_MODE": "token"}, tmp_path / "nowhere") == "token"
    # Ray's own lookup order: the variable, then the path it names (which must exist), then ~/.ray
    assert token_source({"RAY_AUTH_TOKEN": "abc"}, tmp_path / "nowhere") == "RAY_AUTH_TOKEN"
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home) is None
    f = tmp_path / "tok"
    f.write_text("x")
    assert choose_auth_mode({"RAY_AUTH_TOKEN_PATH": str(f)}, tmp_path / "nowhere") == "token"


def test_no_head_at_the_address_is_one_line_naming_it() -> None:
    pytest.importorskip("ray", reason="ray is not installed (pip install 'lambdascale[ray]')")
    port = free_port("127.0.0.1")  # nothing listens there
    with pytest.raises(RayConnectError, match=rf"no Ray cluster at 127\.0\.0\.1:{port} \(.*refused.*\)") as e:
        connect(f"127.0.0.1:{port}")
    assert "\n" not in str(e.value)
    with pytest.raises(RayConnectError, match="is not HOST:PORT"):
        connect("nohost")
