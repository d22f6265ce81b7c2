"""Destroy established TCP sockets by peer, through the kernel's sock_diag netlink.

The operation ``ss -K`` uses (``SOCK_DESTROY``, Linux ≥ 4.5 with
``CONFIG_INET_DIAG_DESTROY``), from the process itself: one dump of the
established TCP sockets and of the listening ones, then one ``SOCK_DESTROY``
per match — no process per ban.  The server sees its socket aborted, the
client a reset.

Only *inbound* connections are destroyed: the local port must be one a local
listener accepts on (and in *ports*, when given); the host's own outgoing
connections are left alone.  IPv4 clients of dual-stack listeners
(``::ffff:a.b.c.d``) count as IPv4.

pyroute2 dumps sock_diag but has no ``SOCK_DESTROY``; the messages are small
and fixed, so they are built here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["SockDiag", "TcpSocket"]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED, TCP_LISTEN = 1, 10

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid.
_REQ = struct.Struct("=BBBxI")
# inet_diag_sockid: sport, dport (big endian), src[16], dst[16], if, cookie[2].
_SOCKID = struct.Struct("=2s2s16s16sI8s")
# inet_diag_msg: family, state, timer, retrans; sockid; expires, rqueue, wqueue, uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")


class TcpSocket(NamedTuple):
    family: int
    local: str
    local_port: int
    peer: str
    peer_port: int
    #: The raw inet_diag_sockid (ports, addresses, interface, cookie).
    sockid: bytes


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    text = socket.inet_ntop(socket.AF_INET6, raw)
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:16])  # an IPv4 client, dual stack
    return text


class SockDiag:
    def __init__(self) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open a sock_diag netlink socket: {exc}") from exc
        self._sock.bind((0, 0))
        self._seq = 0
        self._listening: set[int] = set()
        self._listening_at = -1e9

    def close(self) -> None:
        self._sock.close()

    def _send(self, kind: int, flags: int, payload: bytes) -> int:
        self._seq += 1
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, flags, self._seq, 0)
        self._sock.send(header + payload)
        return self._seq

    def dump(
        self, states: int, families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)
    ) -> list[TcpSocket]:
        """TCP sockets in *states* (a bit mask of TCP states) of *families*."""
        found: list[TcpSocket] = []
        for family in families:
            req = _REQ.pack(family, socket.IPPROTO_TCP, 0, states) + b"\0" * _SOCKID.size
            seq = self._send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, req)
            done = False
            while not done:
                data = self._sock.recv(1 << 20)
                offset = 0
                while offset < len(data):
                    length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                    body = data[offset + _NLMSGHDR.size : offset + length]
                    offset += (length + 3) & ~3
                    if msg_seq != seq:
                        continue
                    if kind == NLMSG_DONE:
                        done = True
                        break
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", body)
                        if code:
                            raise OSError(-code, os.strerror(-code))
                        continue
                    fam = body[0]
                    sockid = body[_MSG_HEAD.size : _MSG_HEAD.size + _SOCKID.size]
                    sport, dport, src, dst, _if, _cookie = _SOCKID.unpack(sockid)
                    found.append(TcpSocket(
                        fam, _address(fam, src), int.from_bytes(sport, "big"),
                        _address(fam, dst), int.from_bytes(dport, "big"), sockid,
                    ))  # fmt: skip
        return found

    def destroy(self, sock: TcpSocket) -> bool:
        """Abort one socket; False when it was gone already."""
        req = _REQ.pack(sock.family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sock.sockid
        seq = self._send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)
        while True:
            data = self._sock.recv(65536)
            _length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, 0)
            if msg_seq != seq or kind != NLMSG_ERROR:
                continue
            (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
            if code == 0:
                return True
            if -code == errno.ENOENT:
                return False
            if -code in (errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
                raise OSError(-code, "SOCK_DESTROY refused: " + os.strerror(-code)
                              + " (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)")  # fmt: skip
            raise OSError(-code, os.strerror(-code))

    def listening(self) -> set[int]:
        """Local ports with a listener (looked up at most once a second)."""
        now = time.monotonic()
        if now - self._listening_at > 1.0:
            self._listening = {s.local_port for s in self.dump(1 << TCP_LISTEN)}
            self._listening_at = now
        return self._listening

    def inbound(self, ports: Iterable[int] = (), version: int = 0) -> list[TcpSocket]:
        """Established connections a local listener accepted (on *ports*, if given;
        with peers of IP *version*, if given — IPv4 peers of dual-stack listeners
        come in IPv6 sockets)."""
        wanted = set(ports)
        listening = self.listening()
        families = (socket.AF_INET6,) if version == 6 else (socket.AF_INET, socket.AF_INET6)
        return [
            s
            for s in self.dump(1 << TCP_ESTABLISHED, families)
            if s.local_port in listening and (not wanted or s.local_port in wanted)
        ]

    def cut_any(
        self,
        targets: Iterable[str],
        *,
        ports: Iterable[int] = (),
        spare: Callable[[str], bool] = lambda peer: False,
    ) -> int:
        """Destroy inbound connections whose peer is in any of *targets*, from one
        dump of the sockets; the number destroyed."""
        networks = [ipaddress.ip_network(t, strict=False) for t in targets]
        versions = {n.version for n in networks}
        cut = 0
        for sock in self.inbound(ports, versions.pop() if len(versions) == 1 else 0):
            peer = ipaddress.ip_address(sock.peer)
            if any(peer.version == n.version and peer in n for n in networks) and not spare(
                sock.peer
            ):
                cut += self.destroy(sock)
        return cut

    def cut(
        self,
        target: str,
        *,
        ports: Iterable[int] = (),
        spare: Callable[[str], bool] = lambda peer: False,
    ) -> int:
        """Destroy inbound connections whose peer is in *target*; the number destroyed.

        :param spare: peers never destroyed (the allowlist).
        """
        return self.cut_any([target], ports=ports, spare=spare)
