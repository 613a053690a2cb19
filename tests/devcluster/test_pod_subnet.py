"""A node's pod subnet never overlaps a network the machine already routes (a left-over bridge's route
made some pods of a new node unreachable: "No route to host")."""

import ipaddress

from dynamo_snapshot.devcluster.node import POD_SUBNETS, free_subnet, routed_networks


def test_the_route_table_is_read_with_its_masks_and_without_the_default_route(tmp_path):
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "dsnab\t00076A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    assert routed_networks(table) == [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("10.106.7.0/24")]


def test_a_new_subnet_avoids_every_routed_network_but_one():
    free = ipaddress.ip_network("10.101.33.0/24")
    taken = [net for net in POD_SUBNETS.subnets(new_prefix=24) if net != free]
    assert free_subnet(taken, tries=100_000) == free


def test_a_machine_with_no_free_subnet_says_what_to_remove():
    try:
        free_subnet([POD_SUBNETS])
    except RuntimeError as err:
        assert "ip link del" in str(err)
    else:
        raise AssertionError("expected a RuntimeError")


def test_this_machines_routes_are_readable():
    assert all(isinstance(net, ipaddress.IPv4Network) for net in routed_networks())
