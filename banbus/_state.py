"""The local state file (opt-in): a node that restarts enforces at once, even without Redis.

Theory of operation
-------------------

``Node(..., state_file=PATH)`` keeps two files beside each other:

* ``PATH`` — the **view**: what the node enforced (bans and allowlist, with
  expiry, reason, origin) and its position in the stream (epoch, seq, last
  entry id).  Rewritten when the view changed, at a bounded rate: at most
  every *interval* seconds, and never more often than ten times the last
  write took (a million entries cost about a second to save).
* ``PATH.outbox`` — the **outbox**: own writes Redis has not answered.
  Rewritten whenever it changes (it is small, and a write decided while
  Redis is away must survive a crash).

Both are written whole to a temporary file, flushed to disk, then renamed over
the old one: a crash leaves the old file or the new one, never half of one.
Each starts with a magic, a format version and a CRC-32 of the body; a file
that is corrupt, of another format, or of another namespace is refused with a
clear error — never half-loaded.

On start the node loads them before anything else: it enforces the view and
queues the outbox, and its ``async with`` body runs even if Redis cannot be
reached.  When Redis answers, the reader judges the saved position like any
reconnect: the same incarnation → the node catches up or reloads; a new
epoch (Redis lost its data while this node was down) → the saved view is
what the node re-seeds from.  Expired entries are dropped at load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import msgspec

from ._exceptions import InvalidInput

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["SavedOutbox", "SavedView", "SavedWrite", "StateFile"]

log = logging.getLogger("banbus")

_MAGIC: Final = b"BBST"
_VERSION: Final = 1


class SavedView(msgspec.Struct, array_like=True):
    """The saved view: position, then ``[target, expires, reason, origin, seq]`` rows."""

    namespace: str
    epoch: str
    seq: int
    last_id: str
    #: Server ms when it was written.
    written: int
    bans: list[tuple[str, int, str, str, int]]
    allows: list[tuple[str, int, str, str, int]]


class SavedWrite(msgspec.Struct, array_like=True):
    """One queued own write."""

    op: str
    target: str
    expires: int
    reason: str
    origin: str
    eid: str
    replace: bool
    force: bool
    ambiguous: bool
    since: int


class SavedOutbox(msgspec.Struct, array_like=True):
    namespace: str
    writes: list[SavedWrite]


_encoder: Final = msgspec.msgpack.Encoder()
_view_decoder: Final = msgspec.msgpack.Decoder(SavedView)
_outbox_decoder: Final = msgspec.msgpack.Decoder(SavedOutbox)


def _frame(kind: bytes, body: bytes) -> bytes:
    header = _MAGIC + bytes((_VERSION,)) + kind
    return header + zlib.crc32(body).to_bytes(4, "big") + body


def _unframe(path: str, kind: bytes, data: bytes) -> bytes:
    header = _MAGIC + bytes((_VERSION,)) + kind
    if not data.startswith(_MAGIC):
        raise InvalidInput(f"{path} is not a banbus state file; move it away or pick another path")
    if not data.startswith(header):
        raise InvalidInput(
            f"{path} is a banbus state file of another version or kind; move it away "
            "(the node starts without it and rebuilds it)"
        )
    crc, body = data[len(header) : len(header) + 4], data[len(header) + 4 :]
    if zlib.crc32(body).to_bytes(4, "big") != crc:
        raise InvalidInput(
            f"{path} is corrupt (checksum mismatch); move it away to start without it"
        )
    return body


def _write_atomically(path: str, data: bytes) -> None:
    """Write *data* to *path*: a temporary file, fsync, rename, fsync of the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateFile:
    """Load and keep saving one node's state (see the module docstring).

    :param path: the view file; the outbox goes to ``path + ".outbox"``.
    :param namespace: the files of another namespace are refused.
    """

    def __init__(self, path: str | os.PathLike[str], namespace: str) -> None:
        self.path = os.fspath(path)
        self.outbox_path = self.path + ".outbox"
        self.namespace = namespace
        self.stats = dict.fromkeys(("view_writes", "outbox_writes"), 0)
        self.last_view_seconds = 0.0

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> tuple[SavedView | None, SavedOutbox | None]:
        """Read both files (either may be absent).

        :raises InvalidInput: a file is corrupt, foreign or of another namespace.
        """
        view = self._read(self.path, b"V", _view_decoder)
        outbox = self._read(self.outbox_path, b"O", _outbox_decoder)
        assert view is None or isinstance(view, SavedView)
        assert outbox is None or isinstance(outbox, SavedOutbox)
        for saved in (view, outbox):
            if saved is not None and saved.namespace != self.namespace:
                raise InvalidInput(
                    f"{self.path} holds namespace {saved.namespace!r}, not {self.namespace!r}; "
                    "give each namespace its own state file"
                )
        return view, outbox

    def _read(self, path: str, kind: bytes, decoder: msgspec.msgpack.Decoder[Any]) -> object:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InvalidInput(f"cannot read the state file {path}: {exc}") from exc
        body = _unframe(path, kind, data)
        try:
            return decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidInput(f"{path} cannot be read ({exc}); move it away") from exc

    # -- saving ----------------------------------------------------------------------------

    async def save_view(self, view: SavedView) -> None:
        started = time.monotonic()
        data = _frame(b"V", _encoder.encode(view))
        await anyio.to_thread.run_sync(_write_atomically, self.path, data)
        self.last_view_seconds = time.monotonic() - started
        self.stats["view_writes"] += 1

    async def save_outbox(self, outbox: SavedOutbox) -> None:
        data = _frame(b"O", _encoder.encode(outbox))
        await anyio.to_thread.run_sync(_write_atomically, self.outbox_path, data)
        self.stats["outbox_writes"] += 1

    async def run(
        self,
        *,
        view_key: Callable[[], object],
        snapshot_view: Callable[[], object],
        outbox_key: Callable[[], object],
        snapshot_outbox: Callable[[], SavedOutbox],
        interval: float,
    ) -> None:
        """Save whatever changed: the outbox within a tick, the view at a bounded rate.

        *snapshot_view* is an async callable that collects the view (in
        chunks, letting the loop run) and returns a :class:`SavedView`.
        """
        saved_view: object = view_key()
        saved_outbox: object = outbox_key()
        next_view = time.monotonic() + interval
        while True:
            await anyio.sleep(0.05)
            try:
                key = outbox_key()
                if key != saved_outbox:
                    await self.save_outbox(snapshot_outbox())
                    saved_outbox = key
                if time.monotonic() >= next_view:
                    key = view_key()
                    if key != saved_view:
                        view = await snapshot_view()  # type: ignore[misc]
                        await self.save_view(view)
                        saved_view = key
                    next_view = time.monotonic() + max(interval, 10 * self.last_view_seconds)
            except OSError as exc:
                log.error("banbus: cannot write the state file %s: %s", self.path, exc)
                next_view = time.monotonic() + max(interval, 5.0)
