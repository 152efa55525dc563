"""The sandbox's pure parts: the uid range, the uid pool across agents, the instances' /etc."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.agent.egress import DEFAULT_DENY, Egress, ruleset
from services.agent.launcher import UidPool, parse_uid_range
from services.agent.namespaces import mounts_under, prepare_etc
from services.agent.sandbox import SandboxError


def test_uid_ranges_parse_and_refuse_root_and_system_uids() -> None:
    assert parse_uid_range("200000-200003") == range(200000, 200004)
    assert parse_uid_range("300000") == range(300000, 300001)
    for bad in ("0-10", "999-2000", "5000-4000", "a-b"):
        with pytest.raises(ValueError):
            parse_uid_range(bad)


def test_two_pools_on_one_host_never_hand_out_the_same_uid(tmp_path: Path) -> None:
    first, second = UidPool(range(200000, 200003), tmp_path), UidPool(range(200000, 200003), tmp_path)
    taken = {first.acquire(), second.acquire(), first.acquire()}
    assert taken == {200000, 200001, 200002}
    with pytest.raises(SandboxError):
        second.acquire()  # the range is used up across both
    held_by_first = sorted(first._held)
    first.release(held_by_first[0])
    assert second.acquire() == held_by_first[0]  # released: the other agent may take it now
    first.close()
    second.close()


def test_prepared_etc_names_every_instance_uid_and_only_copies_small_files(tmp_path: Path) -> None:
    etc = prepare_etc(tmp_path / "etc", range(200000, 200002))
    passwd = (etc / "passwd").read_text()
    assert "sandbox-200000:x:200000:200000" in passwd and "sandbox-200001:x:200001" in passwd
    assert not (etc / "shadow").exists()
    assert (etc / "hostname").read_text() == "sandbox\n"
    assert "127.0.0.1\tlocalhost sandbox" in (etc / "hosts").read_text()


def test_mounts_under_reads_mountinfo_deepest_first(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 27 0:21 / /proc rw - proc proc rw\n"
        "90 27 0:50 / /srv/node/instances rw shared:9 - ext4 /dev/vda rw\n"
        "91 90 0:50 /code/x /srv/node/instances/abc/code ro - ext4 /dev/vda rw\n"
        "92 27 0:50 / /srv/node/instances-other rw - ext4 /dev/vda rw\n"
    )
    assert mounts_under("/srv/node/instances", str(info)) == ["/srv/node/instances/abc/code", "/srv/node/instances"]


def test_egress_links_are_numbered_per_uid_and_the_table_rejects_the_platform() -> None:
    egress = Egress("stoker-test", range(200000, 201024), DEFAULT_DENY)
    assert egress.addresses(200000) == ("10.200.0.1", "10.200.0.2")
    assert egress.addresses(200065) == ("10.200.1.5", "10.200.1.6")
    assert Egress.iface(201023) == "sk201023" and len(Egress.iface(201023) + "p") <= 15  # IFNAMSIZ
    rules = ruleset("stoker-test", [*DEFAULT_DENY, "203.0.113.7"])
    assert 'iifname "sk*" reject with icmpx admin-prohibited' in rules  # nothing of the host itself
    assert 'iifname "sk*" oifname "sk*" reject' in rules  # no instance reaches another
    assert "iifname \"sk*\" ip daddr @deny4 reject" in rules and "203.0.113.7" in rules
    assert "169.254.0.0/16" in rules and "10.0.0.0/8" in rules and "127.0.0.0/8" in rules
    assert 'oifname "sk*" drop' in rules  # nothing new from outside into an instance
    assert "masquerade" in rules and "nfproto ipv6 drop" in rules
