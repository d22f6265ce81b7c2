"""What a node counts: :class:`NodeStatistics`, a frozen snapshot (``Node.statistics()``).

Each counter names the path it proves was taken — recovery tests assert them
(``losses`` and ``reseed_written`` after a wipe, ``retries_duplicate`` after
an ambiguous write, ``forged_entries`` after a hand-made entry …).
"""

from __future__ import annotations

import msgspec

__all__ = ["NodeStatistics"]


class NodeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a node's counters (see :meth:`Node.statistics`)."""

    node_id: str
    namespace: str
    #: Stream events applied (own and others').
    events_applied: int
    #: Stream entries and record values skipped as malformed or forged.
    events_skipped: int
    #: Own events seen coming back from the stream.
    own_events_confirmed: int
    #: Full reloads from the record (gap, trimmed cursor, forged entry, data loss…).
    resyncs: int
    #: Reader reconnections.
    reconnects: int
    #: Time from an event's creation (its stream id) to its application, last event.
    lag_ms: float
    #: The highest lag seen.
    max_lag_ms: float
    #: Bans held locally (expired ones are reclaimed within a second).
    bans_active: int
    #: Of which CIDR networks.
    networks_active: int
    allows_active: int
    #: Local writes waiting for Redis.
    outbox_pending: int
    #: Own writes whose fate is not known yet (in flight, queued, or
    #: acknowledged and not yet seen on the stream).
    writes_pending: int
    #: Own writes dropped because their ban ran out while queued.
    writes_expired: int
    #: Own writes the server refused for good (undone here).
    writes_refused: int
    #: Retries the library recognised as already written (``RETRY``).
    retries_duplicate: int
    #: Retries it could not check (the stream was trimmed past them).
    retries_unverified: int
    #: Sequence number of the last applied event.
    last_seq: int
    #: Redis server clock minus this host's wall clock (expiry uses the server's).
    clock_offset_ms: int
    #: Round trips used to measure the server clock.
    clock_measurements: int
    #: Data losses seen (the record reset or rolled back).
    losses: int
    #: Entries re-seeded after a loss, found present, or found removed since.
    reseed_written: int
    reseed_present: int
    reseed_lifted: int
    #: Entries held here that are being restored.
    reseed_pending: int
    #: Entries found forged (not written by the library) and skipped.
    forged_entries: int
    #: Digest comparisons made, and those that found the view drifted.
    digest_checks: int
    digest_mismatches: int
    #: 1 when the record differed from its own digest at the last reload
    #: (edited by hand; run ``banbus repair``).
    record_digest_mismatch: int
    #: Items in the expiry wheel (bounded by twice the entries held).
    expiry_wheel: int
    connected: bool
    #: ``"server"``, ``"sentinel"`` or ``"cluster"``.
    topology: str = "server"
    #: The namespace's primary (``host:port``; ``-`` unknown or a unix socket).
    primary: str = "-"
    #: Where the reader reads (the primary, or a replica with ``read_from="replica"``).
    reading_from: str = "-"
    #: Times the primary (or the replica read from) moved: failovers, slot moves.
    topology_changes: int = 0
    #: Look-ups of the primary (Sentinel / cluster), and those that failed.
    topology_lookups: int = 0
    topology_lookup_failures: int = 0
    #: With ``read_from="replica"``: how far the view trailed the primary at
    #: the last measurement (every *topology_interval*), in events and in ms
    #: of event time.
    read_lag_events: int = 0
    read_lag_ms: float = 0.0
    #: Stream entries that change nothing held (``would_ban`` notices of
    #: policies in shadow mode, informational entries of newer versions).
    notices_seen: int = 0
    #: Of which ``would_ban`` notices.
    would_bans_seen: int = 0
    #: Reports sent to the function library, and the round trips they took.
    reports_sent: int = 0
    report_round_trips: int = 0
    #: Reports of the same kind and address in one tick, merged into one call.
    reports_coalesced: int = 0
    #: Reports not sent: the address is banned already (no round trip).
    reports_skipped_banned: int = 0
    #: Reports not counted: the address is allowlisted or in ``never_ban``.
    reports_exempt: int = 0
    #: Reports counted on this node because Redis was unreachable.
    reports_counted_locally: int = 0
    #: Bans this node's reports created (in Redis; and counted locally).
    auto_bans: int = 0
    auto_bans_local: int = 0
    #: This node's reports that crossed a policy in shadow mode.
    shadow_crossings: int = 0
    #: ``"full"``, ``"compact"`` or ``"bloom"`` (see ``Node(cache=...)``).
    cache_mode: str = "full"
    #: Bloom mode: "maybe" answers of the filter confirmed against the record,
    #: those found banned, those the record did not hold (false positives or
    #: removed since the load), and those that could not be confirmed (Redis
    #: unreachable: ``check()`` then answers banned).
    bloom_confirmations: int = 0
    bloom_confirmed_banned: int = 0
    bloom_false_positives: int = 0
    bloom_unconfirmed: int = 0
    #: Bloom mode: reloads because the node knew too many targets exactly
    #: (events and confirmations since the load: see ``_cache``).
    bloom_reloads: int = 0
