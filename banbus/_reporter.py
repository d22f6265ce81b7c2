"""The node's side of auto-ban: coalesce, pipeline, and count locally when Redis is away.

:meth:`banbus.Node.report` checks what needs no round trip (an address this
node must never ban, or one already banned), then hands the report here.
Reports of the same kind and address made in the same event-loop tick become
one call (their weights summed); every report of a tick goes out in one
pipelined round trip.  The function library decides; exactly one report per
crossing is told ``banned`` (a coalesced report's companions are told
``coalesced``).

When Redis cannot be reached the same policy is applied on this node
(:class:`~banbus._policy.LocalWindows`): a local crossing bans through
:meth:`banbus.Node.ban`, so the ban is enforced here at once and published
from the outbox.  Policies come from Redis at start and every
*refresh* seconds (the built-in ones until then).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from ._exceptions import BanbusError, InvalidInput, NodeClosed, RedisUnavailable
from ._model import BanRecord
from ._policy import (
    LocalWindows,
    Policy,
    Report,
    ReportStatus,
    builtin_policies,
    parse_policy,
    reason_for,
)
from ._targets import format_target

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._publisher import Publisher
    from ._targets import Target

__all__ = ["Reporter"]

log = logging.getLogger("banbus")


@dataclass
class _Pending:
    address: str
    kind: str
    weight: int = 0
    detail: str = ""
    callers: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Report | None = None
    error: BaseException | None = None


class Reporter:
    def __init__(
        self,
        publisher: Publisher,
        *,
        node_id: str,
        spawn: Callable[..., Any],
        ban: Callable[[str, int, str], Awaitable[BanRecord]],
        wait_for_seq: Callable[[int], Awaitable[None]],
        refresh: float = 10.0,
    ) -> None:
        self._publisher = publisher
        self._node_id = node_id
        self._spawn = spawn
        self._ban = ban
        self._wait_for_seq = wait_for_seq
        self._refresh = refresh
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._scheduled = False
        self.policies: dict[str, Policy] = builtin_policies()
        self.local = LocalWindows()
        self.stats = dict.fromkeys(
            ("sent", "round_trips", "coalesced", "local", "auto_bans", "local_bans", "shadow"), 0
        )

    # -- policies --------------------------------------------------------------------------

    async def load_policies(self) -> None:
        """The namespace's policies (built-in ones stay for kinds Redis does not list)."""
        rows = await self._publisher.call_ro("banbus_policies")
        policies = builtin_policies()
        for row in rows:
            kind, text, source = (x.decode() if isinstance(x, bytes) else str(x) for x in row[:3])
            if source.startswith("invalid"):
                log.error("banbus: policy %s in Redis is %s", kind, source)
                continue
            try:
                policies[kind] = parse_policy(kind, text, source)
            except InvalidInput as exc:
                log.error("banbus: policy %s in Redis cannot be read: %s", kind, exc)
        self.policies = policies

    async def run(self) -> None:
        """Refresh the policies every *refresh* seconds (for counting without Redis)."""
        while True:
            try:
                await self.load_policies()
            except (BanbusError, OSError) as exc:
                log.debug("banbus: cannot refresh the policies: %s", exc)
            await anyio.sleep(self._refresh)

    # -- reports ---------------------------------------------------------------------------

    async def submit(self, address: Target, kind: str, weight: int, detail: str) -> Report:
        key = (kind, address.text)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(address.text, kind)
        else:
            self.stats["coalesced"] += 1
        index = pending.callers
        pending.callers += 1
        pending.weight += weight
        if detail and not pending.detail:
            pending.detail = detail
        if not self._scheduled:
            # Runs after every callback ready in this tick: reports made in
            # the same tick share the round trip.
            self._scheduled = True
            self._spawn(self._flush)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        result = pending.result
        assert result is not None
        if index > 0 and result.banned is not None:
            # Exactly one caller per crossing is told it banned.
            return Report(banned=None, count=result.count, threshold=result.threshold,
                          shadow=False, status="coalesced", target=result.target,
                          kind=kind)  # fmt: skip
        return result

    async def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = list(self._pending.values()), {}
        if not batch:
            return
        commands = []
        for p in batch:
            args: list[Any] = ["FCALL", "banbus_report", 1, self._publisher.function_key,
                               p.address, p.kind, p.weight, "ORIGIN", self._node_id]  # fmt: skip
            if p.detail:
                args += ["DETAIL", p.detail]
            commands.append(tuple(args))
        self.stats["sent"] += len(batch)
        self.stats["round_trips"] += 1
        try:
            try:
                replies = await self._publisher.execute(commands)
            except RedisUnavailable as exc:
                log.info("banbus: Redis unreachable (%s); counting %d report(s) here", exc,
                         len(batch))  # fmt: skip
                for p in batch:
                    await self._settle(p, self._count_locally, p)
                return
            # Bans last: the others are answered at once, then the batch waits
            # once, for its highest ban, to be enforced here.
            pairs = sorted(zip(batch, replies, strict=True), key=lambda pr: _is_ban(pr[1]))
            seqs = [int(raw[4]) for _, raw in pairs if _is_ban(raw)]
            for p, raw in pairs:
                if _is_ban(raw) and seqs:
                    with anyio.move_on_after(2.0):  # return once the bans are enforced here
                        await self._wait_for_seq(max(seqs))
                    seqs = []
                await self._settle(p, self._answered, p, raw)
        except Exception as exc:
            # The callers get the error; the node goes on (this task runs in
            # its task group: raising would stop the reader too).
            log.error("banbus: reports failed: %s", exc)
            for p in batch:
                p.error = p.error or exc
        finally:
            # Cancelled (the node is closing) or failed: no caller waits forever.
            for p in batch:
                if not p.done.is_set():
                    p.error = p.error or NodeClosed(
                        "the node closed before the report was answered"
                    )
                    p.done.set()

    async def _settle(self, p: _Pending, how: Callable[..., Awaitable[Report]], *args: Any) -> None:
        try:
            p.result = await how(*args)
        except Exception as exc:
            p.error = exc
        if p.result is not None or p.error is not None:
            p.done.set()

    async def _answered(self, p: _Pending, raw: Any) -> Report:
        if isinstance(raw, BaseException):
            error = self._publisher.error_of(raw)
            if isinstance(error, RedisUnavailable):
                return await self._count_locally(p)
            raise error
        status, count, threshold, target, seq, _sid, expires, _strike, _window, _ttl, reason = (
            x.decode() if isinstance(x, bytes) else x for x in raw
        )
        status = str(status)
        banned = None
        if status == "banned":
            self.stats["auto_bans"] += 1
            banned = BanRecord(str(target), int(expires), str(reason), self._node_id, int(seq),
                               "ban")  # fmt: skip
        elif status == "shadow":
            self.stats["shadow"] += 1
        return Report(banned=banned, count=int(count), threshold=int(threshold),
                      shadow=status == "shadow", status=_status(status), target=str(target),
                      kind=p.kind)  # fmt: skip

    async def _count_locally(self, p: _Pending) -> Report:
        """Redis is away: the same policy, counted here."""
        self.stats["local"] += 1
        policy = self.policies.get(p.kind)
        if policy is None:
            raise RedisUnavailable(
                f"cannot count a report of kind {p.kind!r}: Redis is unreachable and this node "
                "has not seen that policy"
            )
        target = widen(p.address, policy)
        count, crossed = self.local.add(policy, target, p.weight)
        if not crossed:
            return Report(banned=None, count=count, threshold=policy.threshold, shadow=False,
                          status="local", target=target, kind=p.kind)  # fmt: skip
        if policy.shadow:
            self.stats["shadow"] += 1
            log.warning("banbus: would ban %s (%s, counted on this node; shadow mode)", target,
                        p.kind)  # fmt: skip
            return Report(banned=None, count=count, threshold=policy.threshold, shadow=True,
                          status="shadow", target=target, kind=p.kind)  # fmt: skip
        strike = self.local.strike(policy, target, policy.ban_ttl)
        ttl = policy.ban_ttl(strike)
        record = await self._ban(target, ttl, reason_for(policy, count, strike, p.detail))
        self.stats["local_bans"] += 1
        return Report(banned=record, count=count, threshold=policy.threshold, shadow=False,
                      status="banned", target=target, kind=p.kind)  # fmt: skip


def _is_ban(raw: Any) -> bool:
    if isinstance(raw, BaseException) or not raw:
        return False
    status = raw[0]
    return (status.decode() if isinstance(status, bytes) else str(status)) == "banned"


def widen(address: str, policy: Policy) -> str:
    """*address* widened to the policy's prefix (what is counted and banned)."""
    from ._targets import parse_target

    t = parse_target(address)
    plen = policy.ipv4_prefix if t.version == 4 else policy.ipv6_prefix
    bits = 32 if t.version == 4 else 128
    value = t.value >> (bits - plen) << (bits - plen) if plen < bits else t.value
    return format_target(t.version, value, plen)


def _status(text: str) -> ReportStatus:
    if text in ("counted", "banned", "shadow", "already", "allowed"):
        return text  # type: ignore[return-value]
    raise InvalidInput(f"unexpected report status {text!r} from the function library")
