"""``banbus agent``: enforce a namespace for every server on the host, in the kernel.

The agent follows the namespace exactly like a node (a :class:`banbus.Node`
without a supervisor) and mirrors it into nftables, in its own table
(``inet banbus`` by default)::

    table inet banbus {
        set allow4, allow6      { flags interval }            # accepted first
        set ban4_host, ban6_host { flags timeout }            # addresses
        set ban4_net, ban6_net  { flags interval, timeout }   # networks
        chain input { type filter hook input priority -10; policy accept;
            [tcp dport { PORTS }] ip saddr @allow4 accept … ip saddr @ban4_host drop … }
    }

Addresses and networks live in separate sets, so an address banned on its
own and inside a banned network stays blocked until both are lifted.
nftables refuses overlapping intervals within one set: of nested networks
only the widest is loaded; when it is lifted (or runs out first) the agent
puts the inner ones in its place in the same transaction.  Expiry happens in
the kernel from the server clock's expiry (elements carry a timeout); a
network that contains one which outlives it gets no timeout and is replaced
by the agent on time.

On each ban the agent also destroys the host's established *inbound* TCP
connections from the banned target (:mod:`banbus._sockdiag`), except for
allowlisted peers.  Bootstrap and resyncs replace every set in one atomic
transaction; single changes are one small transaction each.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import anyio

from ._nft import Nft, NftError
from ._policy import escape_text
from ._sockdiag import SockDiag

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._node import Node

__all__ = ["Agent", "ruleset"]

log = logging.getLogger("banbus.agent")

Action = Literal["drop", "reject"]
SETS = ("allow4", "allow6", "ban4_host", "ban6_host", "ban4_net", "ban6_net")


class Element(NamedTuple):
    set: str
    target: str


def ruleset(
    table: str = "banbus",
    *,
    priority: int = -10,
    ports: Iterable[int] = (),
    action: Action = "drop",
) -> str:
    """The table the agent loads (``--dry-run`` prints it)."""
    ports = sorted(set(ports))
    match = f"tcp dport {{ {', '.join(map(str, ports))} }} " if ports else ""
    verdict = "reject" if action == "reject" else "drop"
    lines = [
        f"table inet {table} {{",
        "\tset allow4 { type ipv4_addr; flags interval; }",
        "\tset allow6 { type ipv6_addr; flags interval; }",
        "\tset ban4_host { type ipv4_addr; flags timeout; }",
        "\tset ban6_host { type ipv6_addr; flags timeout; }",
        "\tset ban4_net { type ipv4_addr; flags interval, timeout; }",
        "\tset ban6_net { type ipv6_addr; flags interval, timeout; }",
        "\tchain input {",
        f"\t\ttype filter hook input priority {priority}; policy accept;",
        f"\t\t{match}ip saddr @allow4 accept",
        f"\t\t{match}ip6 saddr @allow6 accept",
        f"\t\t{match}ip saddr @ban4_host {verdict}",
        f"\t\t{match}ip saddr @ban4_net {verdict}",
        f"\t\t{match}ip6 saddr @ban6_host {verdict}",
        f"\t\t{match}ip6 saddr @ban6_net {verdict}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _version(target: str) -> int:
    return 6 if ":" in target else 4


def _maximal(entries: dict[str, int]) -> dict[str, tuple[int, bool]]:
    """Networks not covered by another: target -> (expires, kernel timeout allowed).

    An entry covered by a wider one is left out while the wider one lives; a
    wider one that covers an entry outliving it must not expire in the kernel
    (the agent replaces it on time).
    """
    nets = sorted(
        ((ipaddress.ip_network(t), e, t) for t, e in entries.items()),
        key=lambda x: x[0].prefixlen,
    )
    kept: list[tuple[Any, int, str]] = []
    out: dict[str, tuple[int, bool]] = {}
    for net, expires, text in nets:
        outer = next((k for k in kept if k[0].version == net.version and net.subnet_of(k[0])), None)
        if outer is None:
            kept.append((net, expires, text))
            out[text] = (expires, True)
            continue
        outer_expires = outer[1]
        if outer_expires and (not expires or expires > outer_expires):
            out[outer[2]] = (out[outer[2]][0], False)  # the inner one outlives it
    return out


class Agent:
    """Mirror *node*'s view into nftables and cut inbound connections on ban."""

    def __init__(
        self,
        node: Node,
        *,
        table: str = "banbus",
        priority: int = -10,
        ports: Iterable[int] = (),
        action: Action = "drop",
        keep: bool = False,
        nft: Nft | None = None,
        diag: SockDiag | None = None,
    ) -> None:
        self.node = node
        self.table = table
        self.priority = priority
        self.ports = sorted(set(ports))
        self.action = action
        self.keep = keep
        self._nft = nft
        self._diag = diag
        #: What is loaded: element -> (expiry in server ms, 0 permanent; whether the
        #: kernel expires it).
        self.loaded: dict[Element, tuple[int, bool]] = {}
        self._dirty = anyio.Event()
        self._cuts: list[str] = []
        self._next_deadline = 0
        self.stats = dict.fromkeys(
            ("transactions", "full_loads", "elements_added", "elements_deleted",
             "connections_cut", "errors"), 0,
        )  # fmt: skip
        self.last_event_ms = 0
        node.heartbeat_extra = self.counters

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    @property
    def diag(self) -> SockDiag:
        if self._diag is None:
            self._diag = SockDiag()
        return self._diag

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
        if self._nft is not None:
            self._nft.close()

    # -- the table ------------------------------------------------------------------------

    def install(self) -> None:
        """Create (or replace) the table, then load the whole view (one transaction)."""
        desired = self._desired()
        commands = f"add table inet {self.table}\ndelete table inet {self.table}\n"
        commands += ruleset(self.table, priority=self.priority, ports=self.ports,
                            action=self.action)  # fmt: skip
        commands += self._full_load_commands(desired)
        self.nft.run(commands)
        self._loaded_all(desired)

    def present(self) -> bool:
        """Is the table still there (a `nft flush ruleset`, a firewall reload…)?"""
        try:
            self.nft.run(f"list table inet {self.table}\n")
        except NftError:
            return False
        return True

    def remove(self) -> None:
        if not self.keep:
            try:
                self.nft.run(f"delete table inet {self.table}\n")
            except NftError as exc:
                log.warning("banbus agent: could not remove table inet %s: %s", self.table, exc)

    # -- what should be loaded --------------------------------------------------------------

    def _desired(self) -> dict[Element, tuple[int, bool]]:
        node = self.node
        now = node.server_time()
        desired: dict[Element, tuple[int, bool]] = {}
        nets: dict[int, dict[str, int]] = {4: {}, 6: {}}
        for record in node.bans():
            if record.expires and record.expires <= now:
                continue
            v = _version(record.target)
            if "/" in record.target:
                nets[v][record.target] = record.expires
            else:
                desired[Element(f"ban{v}_host", record.target)] = (record.expires, True)
        for v in (4, 6):
            for target, value in _maximal(nets[v]).items():
                desired[Element(f"ban{v}_net", target)] = value
        allows: dict[int, dict[str, int]] = {4: {}, 6: {}}
        for record in node.allows():
            if not record.expires or record.expires > now:
                allows[_version(record.target)][record.target] = record.expires
        for v in (4, 6):
            for target, (expires, _) in _maximal(allows[v]).items():
                # allow sets have no timeout flag: the agent removes them on time.
                desired[Element(f"allow{v}", target)] = (expires, False)
        deadlines = [e for e, timed in desired.values() if e and not timed]
        self._next_deadline = min(deadlines) if deadlines else 0
        return desired

    def _element(self, element: Element, expires: int, timed: bool, now: int) -> str:
        if expires and timed:
            return f"{element.target} timeout {max(1, expires - now)}ms"
        return element.target

    def _full_load_commands(self, desired: dict[Element, tuple[int, bool]]) -> str:
        now = self.node.server_time()
        lines = [f"flush set inet {self.table} {name}" for name in SETS]
        by_set: dict[str, list[str]] = {}
        for element, (expires, timed) in desired.items():
            by_set.setdefault(element.set, []).append(self._element(element, expires, timed, now))
        for name, items in by_set.items():
            for start in range(0, len(items), 10_000):
                chunk = ", ".join(items[start : start + 10_000])
                lines.append(f"add element inet {self.table} {name} {{ {chunk} }}")
        return "\n".join(lines) + "\n"

    def _loaded_all(self, desired: dict[Element, tuple[int, bool]]) -> None:
        """After a full load went through: *desired* is what the kernel holds."""
        self.loaded = dict(desired)
        self.stats["elements_added"] += len(desired)
        self.stats["full_loads"] += 1
        self.stats["transactions"] += 1

    # -- keeping it in step -------------------------------------------------------------------

    def reconcile(self) -> None:
        """Apply the difference between the view and what is loaded (one transaction);
        on any error, replace everything (one transaction)."""
        desired = self._desired()
        now = self.node.server_time()
        adds: dict[str, list[str]] = {}
        deletes: dict[str, list[str]] = {}
        for element, (expires, timed) in self.loaded.items():
            want = desired.get(element)
            if want == (expires, timed):
                continue
            # The kernel removes what it expires: an element no longer wanted and
            # about to run out is left to it (deleting one it removed already would
            # fail the transaction); one wanted with another expiry is replaced.
            if want is None and timed and expires and expires <= now + 1000:
                continue
            deletes.setdefault(element.set, []).append(element.target)
        for element, value in desired.items():
            if self.loaded.get(element) != value:
                adds.setdefault(element.set, []).append(self._element(element, *value, now))
        if not adds and not deletes:
            self.loaded = dict(desired)
            return
        lines = [f"delete element inet {self.table} {name} {{ {', '.join(items)} }}"
                 for name, items in deletes.items()]  # fmt: skip
        lines += [f"add element inet {self.table} {name} {{ {', '.join(items)} }}"
                  for name, items in adds.items()]  # fmt: skip
        try:
            self.nft.run("\n".join(lines) + "\n")
            self.stats["elements_added"] += sum(map(len, adds.values()))
            self.stats["elements_deleted"] += sum(map(len, deletes.values()))
            self.loaded = dict(desired)
            self.stats["transactions"] += 1
        except NftError as exc:
            self.stats["errors"] += 1
            log.warning("banbus agent: incremental update refused (%s); reloading the table", exc)
            self.install()  # the whole table again, in one transaction

    def counters(self) -> dict[str, int]:
        """The agent's counters (in its heartbeat: ``banbus agent status``)."""
        return {**self.stats, "elements_loaded": len(self.loaded),
                "last_event_ms": self.last_event_ms}  # fmt: skip

    def _banned(self, target: str) -> None:
        """A ban landed (the node's apply path): cut at once, reconcile soon."""
        self._cuts.append(target)
        self.last_event_ms = self.node.server_time()
        self._dirty.set()

    async def run(self) -> None:
        """Follow the node: reconcile on every change and every second; cut on bans."""
        unsubscribe = self.node.subscribe(self._banned)
        last_seq = last_resyncs = -1
        next_check = time.monotonic() + 5.0
        try:
            while True:
                with anyio.move_on_after(0.1):
                    await self._dirty.wait()
                self._dirty = anyio.Event()
                cuts, self._cuts = list(dict.fromkeys(self._cuts)), []
                try:
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + 5.0
                        if not self.present():
                            log.warning("banbus agent: table inet %s vanished (a ruleset "
                                        "flush?); loading it again", self.table)  # fmt: skip
                            self.install()
                    # New connections are dropped before established ones are cut
                    # (no window for a reconnect): new addresses go in at once;
                    # anything else goes through the full reconcile first.
                    fast = bool(cuts) and all("/" not in t for t in cuts) and self._add_hosts(cuts)
                    stats = self.node.statistics()
                    due = self._next_deadline and self.node.server_time() >= self._next_deadline
                    changed = stats.last_seq != last_seq or stats.resyncs != last_resyncs
                    if not fast and (cuts or changed or due):
                        last_seq, last_resyncs = stats.last_seq, stats.resyncs
                        self.reconcile()
                    if cuts:
                        self.stats["connections_cut"] += self._cut_all(cuts)
                    if fast and (changed or due):
                        last_seq, last_resyncs = stats.last_seq, stats.resyncs
                        self.reconcile()
                except NftError as exc:
                    # Never stop enforcing what is loaded: say so and try again.
                    self.stats["errors"] += 1
                    self.loaded = {}  # unknown now: the next pass reloads
                    log.error("banbus agent: nftables refused an update: %s", exc)
                    self._dirty.set()
                    await anyio.sleep(1.0)
        finally:
            unsubscribe()

    def _add_hosts(self, targets: list[str]) -> bool:
        """The fast path of a ban: its addresses into the host sets, one transaction.
        False when that cannot be done here (the reconcile will)."""
        now = self.node.server_time()
        adds: dict[str, list[str]] = {}
        added: dict[Element, tuple[int, bool]] = {}
        for target in targets:
            entry = self.node.cache.entry("ban", target)
            if entry is None or (entry.expires and entry.expires <= now):
                continue
            element = Element(f"ban{_version(target)}_host", target)
            if self.loaded.get(element) == (entry.expires, True):
                continue
            # An element already loaded with another expiry is replaced by the reconcile.
            if element in self.loaded:
                return False
            adds.setdefault(element.set, []).append(
                self._element(element, entry.expires, True, now)
            )
            added[element] = (entry.expires, True)
        if adds:
            lines = [f"add element inet {self.table} {name} {{ {', '.join(items)} }}"
                     for name, items in adds.items()]  # fmt: skip
            try:
                self.nft.run("\n".join(lines) + "\n")
            except NftError:
                return False
            self.loaded.update(added)
            self.stats["transactions"] += 1
            self.stats["elements_added"] += sum(map(len, adds.values()))
        return True

    def _cut_all(self, targets: list[str]) -> int:
        """Destroy inbound connections from any of *targets* (one socket dump)."""
        started = time.perf_counter()
        node = self.node
        try:
            # A notification also comes when an allowlist entry goes: only peers
            # that are banned now are cut (the allowlist is part of that answer).
            count = self.diag.cut_any(targets, ports=self.ports,
                                      spare=lambda peer: not node.is_banned(peer))  # fmt: skip
        except OSError as exc:
            self.stats["errors"] += 1
            log.error("banbus agent: cannot destroy connections: %s", exc)
            return 0
        if count:
            log.info("banbus agent: cut %d connection(s) in %.2f ms", count,
                     (time.perf_counter() - started) * 1000)  # fmt: skip
        return count

    def elements(self) -> dict[str, int]:
        """Elements loaded per set (from the kernel)."""
        return table_elements(self.nft, self.table)

    def dry_run(self) -> str:
        """The whole transaction :meth:`install` would apply (nothing is applied)."""
        loaded, stats = self.loaded, dict(self.stats)
        table = ruleset(self.table, priority=self.priority, ports=self.ports, action=self.action)
        try:
            return table + self._full_load_commands(self._desired())
        finally:
            self.loaded, self.stats = loaded, stats


def table_elements(nft: Nft, table: str) -> dict[str, int]:
    data = nft.json(f"list table inet {table}")
    counts = dict.fromkeys(SETS, 0)
    for item in data.get("nftables", []):
        s = item.get("set")
        if s and s.get("name") in counts:
            counts[s["name"]] = len(s.get("elem", []))
    return counts


# -- the command ----------------------------------------------------------------------------


async def run_agent(args: Any) -> int:
    """``banbus agent``: follow the namespace until interrupted."""
    import signal
    import socket

    from ._node import Node

    node_id = args.node_id or f"agent@{socket.gethostname()}"[:64]
    async with Node(args.redis, namespace=args.namespace, node_id=node_id,
                    reseed=False) as node:  # fmt: skip
        agent = Agent(node, table=args.table, priority=args.hook_priority, ports=args.ports,
                      action=args.action, keep=args.keep)  # fmt: skip
        if args.dry_run:
            print(agent.dry_run(), end="")
            return 0
        agent.install()
        try:
            if getattr(args, "metrics_port", 0):
                from prometheus_client import start_http_server

                from .metrics import register

                register(node)
                start_http_server(args.metrics_port)
            counts = agent.elements()
            print(f"banbus agent {node_id}: table inet {args.table} loaded "
                  f"({sum(counts.values()):,} elements); following {args.namespace!r}",
                  flush=True)  # fmt: skip
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent.run)
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        break
        finally:
            agent.remove()
            agent.close()
    return 0


def agent_status(table: str, beat: Any | None = None, now_ms: int = 0) -> str:
    """The table's element counts (this host's kernel), and the agent's heartbeat."""
    nft = Nft()
    try:
        elements = table_elements(nft, table)
    finally:
        nft.close()
    lines = [f"table inet {table}:"]
    lines += [f"  {name:<10} {count:,}" for name, count in elements.items()]
    if beat is None:
        lines.append("agent: no heartbeat in Redis (not running, or another --node-id)")
        return "\n".join(lines)
    extra = beat.extra
    last = extra.get("last_event_ms", 0)
    lines.append(
        f"agent {escape_text(beat.node_id)}: seq {beat.seq}, lag {beat.lag_ms:.1f} ms, "
        f"{'connected' if beat.connected else 'NOT connected'}, heard "
        f"{(now_ms - beat.sent_ms) / 1000:.1f} s ago; last ban "
        f"{f'{(now_ms - last) / 1000:.1f} s ago' if last else 'none yet'}"
    )
    lines.append("  " + ", ".join(f"{escape_text(k)} {v:,}" for k, v in extra.items()
                                  if k != "last_event_ms"))  # fmt: skip
    return "\n".join(lines)
