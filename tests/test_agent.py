"""``banbus agent`` (issue 10): nftables sets and socket destroy for any server on the host.

The end-to-end test runs inside a private network namespace (``unshare -n``,
root): nothing touches the host's own rules.  The rest needs no privilege.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from banbus._cli import main as cli_main
from banbus.agent import _maximal, ruleset

ROOT = Path(__file__).resolve().parents[1]


def _namespace_reason() -> str | None:
    if ctypes.util.find_library("nftables") is None:
        return "libnftables is not installed (apt install nftables)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is missing"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace here ({probe.stderr.strip()}); needs root"
    return None


def test_the_ruleset() -> None:
    text = ruleset("bb", priority=-5, ports=[443, 25, 25], action="reject")
    assert "table inet bb {" in text
    assert "type filter hook input priority -5; policy accept;" in text
    assert "tcp dport { 25, 443 } ip saddr @allow4 accept" in text
    assert "tcp dport { 25, 443 } ip6 saddr @ban6_net reject" in text
    # The allowlist is matched before any ban.
    assert text.index("@allow4") < text.index("@ban4_host") < text.index("@ban4_net")
    plain = ruleset()
    assert "dport" not in plain and "ip saddr @ban4_host drop" in plain


def test_nested_networks_keep_the_widest_and_say_when_it_must_not_expire() -> None:
    loaded = _maximal({"10.0.0.0/8": 1000, "10.1.0.0/16": 0, "10.2.0.0/16": 500,
                       "192.0.2.0/24": 0, "192.0.2.0/25": 0})  # fmt: skip
    # 10.1/16 outlives 10/8 (permanent): 10/8 gets no kernel timeout.
    assert loaded == {"10.0.0.0/8": (1000, False), "192.0.2.0/24": (0, True)}
    assert _maximal({"2001:db8::/32": 5, "2001:db8::/48": 3}) == {"2001:db8::/32": (5, True)}


def test_dry_run_prints_the_ruleset_and_the_elements(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def cli(*args: str) -> int:
        return cli_main(["--redis", redis_url, "-n", namespace, *args])

    assert cli("ban", "203.0.113.7", "--ttl", "1h") == 0
    assert cli("ban", "198.51.100.0/24") == 0
    assert cli("allow", "192.0.2.1") == 0
    capsys.readouterr()
    assert cli("agent", "--dry-run", "--ports", "25,8000-8002") == 0
    out = capsys.readouterr().out
    assert "tcp dport { 25, 8000, 8001, 8002 }" in out
    assert "add element inet banbus ban4_host { 203.0.113.7 timeout " in out
    assert "add element inet banbus ban4_net { 198.51.100.0/24 }" in out
    assert "add element inet banbus allow4 { 192.0.2.1 }" in out
    with pytest.raises(SystemExit) as bad:  # argparse: usage and exit 2
        cli("agent", "--ports", "0-5")
    assert bad.value.code == 2
    assert "outside 1-65535" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.real_redis
def test_agent_end_to_end_in_a_network_namespace() -> None:
    """A server that imports nothing from banbus: a ban made with FCALL resets its
    established connection from the banned address within milliseconds and drops new
    ones; CIDR, IPv6, allowlist, unban, expiry in the kernel, nested networks, an
    address inside a lifted network; the table is removed on exit; --ports; a resync
    after the stream was trimmed past it; a restart with 100k bans; no capability."""
    reason = _namespace_reason()
    if reason is not None:
        pytest.skip(reason)
    result = subprocess.run(
        ["unshare", "-n", sys.executable, str(ROOT / "tests" / "_agent_scenario.py")],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["agent_started"].endswith("following 'agent'")
    assert out["bootstrap_blocked"]  # a ban made before the agent started
    # Established connections reset within milliseconds (a generous bound).
    for key in ("reset_ms", "cidr_reset_ms", "v6_reset_ms"):
        assert out[key] is not None and out[key] < 1000, (key, out[key])
    assert out["bystander_alive"] and not out["new_from_banned"]
    assert out["allow_loaded"] and out["allowed_alive"] and out["allowed_new"]
    assert not out["cidr_new"] and not out["v6_new"]
    assert out["after_unban"]
    assert out["expiring_blocked"] and out["expired_open"]
    assert out["outer_blocked"] and out["outer_expired"] and out["inner_still_blocked"]
    assert out["net_loaded"] and out["net_unloaded"]
    assert out["host_inside_lifted_net_blocked"] and out["net_lifted_open"]
    assert out["office_allowed"] and out["office_disallowed"] and out["office_alive"]
    assert out["table_back"]  # a ruleset flush behind its back: loaded again
    assert "ban4_host" in out["status"]
    assert "agent agent@" in out["status"] and "connections_cut " in out["status"]
    assert "refused" not in out["agent_stderr"], out["agent_stderr"]
    assert "banbus" not in out["tables_after_exit"]  # removed on exit
    # --ports: only the listed local port is filtered and cut.
    assert out["ports_reset_ms"] is not None and out["ports_reset_ms"] < 1000
    assert out["ports_other_alive"] and out["ports_other_new"] and not out["ports_listed_new"]
    # The stream trimmed past a stopped agent: it reloads and replaces the sets.
    assert out["resync_loaded"] and out["resync_blocks"]
    # A restart with 100k bans: everything loaded before it says it runs.
    assert "loaded (100,000 elements)" in out["big_started"] and out["big_blocked"]
    # --keep (and --table, --hook-priority): the table outlives the agent.
    assert "hook input priority filter - 20" in out["kept_after_exit"] or (
        "priority -20" in out["kept_after_exit"]
    ), out["kept_after_exit"]
    # Without the capability: exit 2 and what to do.
    assert out["nocap_rc"] == 2
    assert "needs root or CAP_NET_ADMIN" in out["nocap_stderr"]


def test_the_systemd_unit() -> None:
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "contrib" / "banbus-agent.service")
    assert unit["Service"]["ExecStart"].endswith("banbus agent")
    assert unit["Service"]["AmbientCapabilities"] == "CAP_NET_ADMIN"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
