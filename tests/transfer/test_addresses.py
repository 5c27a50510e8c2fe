"""Listen addresses: literals, interface names and ``auto`` (the route toward a peer); the
controller's defaults per launcher."""

from __future__ import annotations

import pytest

from lambdascale.runtime.launcher import LocalCluster, controller_addresses
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.addresses import AddressError, bind_transport, interface_address, resolve, route_source
from lambdascale.transfer.settings import TransferSettings


def test_resolve_literals_interfaces_and_auto() -> None:
    assert resolve(None) == "127.0.0.1" and resolve(None, default="0.0.0.0") == "0.0.0.0"
    assert resolve("10.1.2.3") == "10.1.2.3" and resolve("::1") == "::1"
    assert resolve("auto") == "127.0.0.1"  # no peer: loopback
    assert resolve("auto", toward="127.0.0.1") == "127.0.0.1" == route_source("127.0.0.1")
    assert interface_address("lo") == "127.0.0.1" == resolve("lo")
    with pytest.raises(AddressError, match="no network interface 'nosuch0'.*lo"):
        resolve("nosuch0")


def test_an_agent_binds_toward_its_controller_and_advertises_what_peers_dial() -> None:
    t = bind_transport(TransferSettings(), "127.0.0.1")
    assert (t.bind, t.advertise) == ("127.0.0.1", "127.0.0.1")
    t = bind_transport(TransferSettings(bind="0.0.0.0"), "127.0.0.1")  # every interface: advertise the route's
    assert (t.bind, t.advertise) == ("0.0.0.0", "127.0.0.1")
    t = bind_transport(TransferSettings(bind="lo", advertise="10.9.9.9"), "127.0.0.1")
    assert (t.bind, t.advertise) == ("127.0.0.1", "10.9.9.9")


def test_controller_addresses_by_launcher() -> None:
    assert controller_addresses(RuntimeSettings()) == ("127.0.0.1", "127.0.0.1")
    assert controller_addresses(RuntimeSettings(launcher="external", controller_port=7077)) == ("0.0.0.0", "127.0.0.1")
    assert controller_addresses(RuntimeSettings(launcher="ray", address="127.0.0.1:6379")) == ("127.0.0.1", "127.0.0.1")
    assert controller_addresses(RuntimeSettings(controller_bind="lo", controller_advertise="10.0.0.5")) == \
        ("127.0.0.1", "10.0.0.5")


def test_external_agents_need_a_secret_file_and_a_fixed_port(tmp_path) -> None:
    from lambdascale.errors import LambdaScaleError

    with pytest.raises(LambdaScaleError, match="needs runtime.secret_file"):
        LocalCluster(2, runtime=RuntimeSettings(launcher="external", controller_port=7077))
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32)
    secret.chmod(0o600)
    with pytest.raises(LambdaScaleError, match="fixed runtime.controller_port"):
        LocalCluster(2, runtime=RuntimeSettings(launcher="external", secret_file=str(secret)))
