"""The server counts what its own connections carried: the `wire` byte level (docs/design.md §5).

Linux keeps byte counters per TCP connection (TCP_INFO): `tcpi_bytes_received`, the payload bytes the
server's socket received in order, and `tcpi_bytes_acked`, the payload bytes it sent that the peer
acknowledged. `TcpInfo` reads them for the server-side socket of one client connection through
sock_diag netlink (inet_diag, INET_DIAG_INFO). The first call of a connection finds its socket with a
dump filtered in the kernel by the two ports (inet_diag bytecode) and the peer's address, keeping the
socket's id (addresses, ports, cookie). Every later read is an exact lookup of that id (~10 us). No
root is needed. pyroute2's `DiagSocket.get_sock_stats` only dumps every TCP socket of the host and
decodes each in Python (~0.5 ms per dump here, plus a 0.3 s import): the two requests are built here
with `socket` and `struct` instead, and the reply's tcp_info is read at its fixed offsets.

What the counts include: every byte TCP carried as payload in that direction: TLS records when TLS
is on, HTTP/2 frames (HEADERS, DATA, WINDOW_UPDATE, PING, SETTINGS, the connection preface) and
gRPC's message prefixes. They exclude IP and TCP headers, SYN/FIN, and retransmissions (an acked byte
counts once).

Attribution (`WireMeter`): one client's calls are sequential (efmuon's worker makes one call at a
time on its own connection), so a call's share is read from snapshots of its connection's counters:
  up    what the connection received from the end of the previous call's request to the end of
        this call's request (a Join's and a Leave's request is complete when the handler starts,
        an Exchange's when its last chunk was read);
  down  what the peer acknowledged from this call's start to the next call's start: the client
        begins its next call only once it has the whole reply, so by then the reply is acked.
So the connection's bytes from its first (preface, settings, a Status call before Join) up to the
Leave request are all counted, once; the Leave reply is not (no call follows it). Bytes of a call
that names no client (Status) or that is refused before it names one fall into the next counted
call of the same connection. A client that multiplexes several client ids on one connection gets
the connection's bytes split by call order. A connection the kernel no longer has (closed) cannot
be read: its bytes since the last snapshot are not counted (`ByteLedger.unmeasured`).

Without inet_diag (not Linux, or the kernel refuses) the `ByteLedger` keeps the clients' own
WireReports as `wire` and the report says `summary.wire_source = "client"`.
"""
from __future__ import annotations

import logging
import socket
import struct
import urllib.parse
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ledger import ByteLedger

log = logging.getLogger("efmuon.server")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1  # request attribute
INET_DIAG_INFO = 2  # reply attribute: struct tcp_info
INET_DIAG_BC_S_EQ, INET_DIAG_BC_D_EQ = 11, 12
TCP_LISTEN = 10
# the states of a connected socket: all but TIME_WAIT (6), CLOSE (7) and LISTEN (10)
CONNECTED_STATES = 0xFFF & ~((1 << 6) | (1 << 7) | (1 << TCP_LISTEN))
TCPI_BYTES_ACKED, TCPI_BYTES_RECEIVED = 120, 128  # offsets in struct tcp_info (Linux >= 4.2)
TCPI_MIN_LEN = TCPI_BYTES_RECEIVED + 8
MSG_HEADER = struct.Struct("<IHHII")  # struct nlmsghdr
DIAG_MSG_LEN = 72  # struct inet_diag_msg
SOCKID = slice(4, 52)  # struct inet_diag_sockid in inet_diag_msg: ports, addresses, interface, cookie
NETLINK_TIMEOUT = 1.0  # seconds a netlink reply may take (it takes microseconds)
MAX_CONNECTIONS = 16384  # connections remembered beyond the clients' own (least recently used forgotten)


def parse_peer(peer: str) -> tuple[int, bytes, int] | None:
    """gRPC's `context.peer()` ('ipv4:127.0.0.1:PORT', 'ipv6:[::1]:PORT', 'ipv6:%5B::1%5D:PORT') ->
    (family, packed address, port); None for anything else (a Unix socket, an odd string)."""
    kind, _, rest = urllib.parse.unquote(peer or "").partition(":")
    host, sep, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not sep or not port.isdigit():
        return None
    family = socket.AF_INET if kind == "ipv4" else socket.AF_INET6
    try:
        return family, socket.inet_pton(family, host.strip("[]").split("%")[0]), int(port)
    except OSError:
        return None


class TcpInfo:
    """A sock_diag netlink socket that reads (bytes_received, bytes_acked) of server-side TCP sockets.

    `open()` raises OSError when the kernel has no sock_diag (or refuses it); every read afterwards
    returns None rather than raising when a socket is gone or a reply is odd."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.seq = 0

    def open(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        sock.settimeout(NETLINK_TIMEOUT)
        sock.bind((0, 0))
        self.sock = sock
        weakref.finalize(self, sock.close)  # closed with this object, even if nobody calls close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _request(self, family: int, states: int, sockid: bytes, dump: bool, bytecode: bytes = b"") -> list[bytes]:
        """Send one inet_diag_req_v2 asking for tcp_info; the inet_diag_msg replies. Raises OSError."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        body = struct.pack("<BBBBI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states) + sockid
        if bytecode:
            body += struct.pack("<HH", 4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        self.sock.send(MSG_HEADER.pack(MSG_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, flags, self.seq, 0) + body)
        out: list[bytes] = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + MSG_HEADER.size <= len(data):
                length, kind, _, seq, _ = MSG_HEADER.unpack_from(data, off)
                if length < MSG_HEADER.size:
                    raise OSError("a malformed netlink reply")
                msg = data[off + MSG_HEADER.size:off + length]
                off += (length + 3) & ~3
                if seq != self.seq:
                    continue  # a late reply to an earlier request (it timed out)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    errno = -struct.unpack_from("<i", msg)[0]
                    if errno == 0:
                        return out
                    raise OSError(errno, f"sock_diag: {errno}")
                out.append(msg)
                if not dump:
                    return out

    @staticmethod
    def _counters(msg: bytes) -> tuple[int, int] | None:
        """(bytes_received, bytes_acked) from one inet_diag_msg's INET_DIAG_INFO, or None."""
        off = DIAG_MSG_LEN
        while off + 4 <= len(msg):
            length, kind = struct.unpack_from("<HH", msg, off)
            if length < 4:
                return None
            if kind == INET_DIAG_INFO and length - 4 >= TCPI_MIN_LEN:
                acked, received = struct.unpack_from("<QQ", msg, off + 4 + TCPI_BYTES_ACKED)
                return received, acked
            off += (length + 3) & ~3
        return None

    @staticmethod
    def _ports_bytecode(local_port: int, peer_port: int) -> bytes:
        """inet_diag bytecode: local port == local_port and remote port == peer_port (else: reject,
        a jump past the end)."""
        return (struct.pack("<BBHBBH", INET_DIAG_BC_S_EQ, 8, 20, 0, 0, local_port)
                + struct.pack("<BBHBBH", INET_DIAG_BC_D_EQ, 8, 12, 0, 0, peer_port))

    def listening(self, port: int) -> bool:
        """True when the kernel shows a listening socket on `port` with the byte counters (the probe)."""
        for family in (socket.AF_INET, socket.AF_INET6):
            sockid = struct.pack(">HH", port, 0) + bytes(40) + b"\xff" * 4
            try:
                for msg in self._request(family, 1 << TCP_LISTEN, sockid, True, self._ports_bytecode(port, 0)):
                    if struct.unpack_from(">H", msg, 4)[0] == port and self._counters(msg) is not None:
                        return True
            except OSError as exc:
                log.debug("sock_diag probe (family %d): %s", family, exc)
        return False

    def find(self, local_port: int, peer: tuple[int, bytes, int]) -> tuple[int, bytes] | None:
        """The server-side socket connected to `peer` on `local_port`: (family, its inet_diag_sockid)."""
        family, addr, port = peer
        tries = [(family, addr)]
        if family == socket.AF_INET:  # a dual-stack listener holds IPv4 peers as ::ffff:a.b.c.d
            tries.append((socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + addr))
        sockid = struct.pack(">HH", local_port, port) + bytes(40) + b"\xff" * 4  # no cookie
        for fam, dst in tries:
            try:
                replies = self._request(fam, CONNECTED_STATES, sockid, True, self._ports_bytecode(local_port, port))
            except OSError:
                continue
            for msg in replies:
                if len(msg) >= DIAG_MSG_LEN and msg[0] == fam and msg[24:24 + len(dst)] == dst:
                    return fam, msg[SOCKID]
        return None

    def read(self, family: int, sockid: bytes) -> tuple[int, int] | None:
        """(bytes_received, bytes_acked) of the socket `sockid` names (its cookie included), or None
        when it is gone (closed, or another socket has its addresses now)."""
        try:
            replies = self._request(family, CONNECTED_STATES, sockid, False)
        except OSError:
            return None
        for msg in replies:
            if len(msg) >= DIAG_MSG_LEN and msg[SOCKID][-8:] == sockid[-8:] and msg[1] != TCP_LISTEN:
                return self._counters(msg)
        return None


@dataclass
class Connection:
    """One client connection as the server sees it: its socket and the counters already attributed."""

    family: int
    sockid: bytes
    rx: int = 0  # bytes_received up to the end of the last attributed request
    acked: int = 0  # bytes_acked up to the start of the last call
    pending: tuple[int, int] | None = None  # (round, client) the downlink since `acked` belongs to


@dataclass
class Call:
    """A call's snapshot of its connection at its start (None: the connection could not be read)."""

    conn: Connection | None
    rx: int = 0
    key: str = ""
    renewed: bool = False  # the peer's earlier connection is gone: what it carried last was not read


class WireMeter:
    """Per-call wire figures from the server's own sockets into the `ByteLedger` (module docstring).

    The servicer calls `listening(port)` once the server is bound, `start(context.peer())` when a call
    begins, and `uplink(call, round, client, down_round)` once the call's request is complete and its
    client known. Everything runs on the event loop's thread."""

    def __init__(self, ledger: ByteLedger):
        self.ledger = ledger
        self.port: int | None = None
        self.info: TcpInfo | None = None
        self.conns: OrderedDict[str, Connection] = OrderedDict()  # by peer
        self.client_conn: dict[int, str] = {}  # client -> the peer of its last counted call

    def listening(self, port: int) -> bool:
        """The server listens on `port`: count there when the kernel lets us (else the clients'
        figures are the wire level). Returns whether the server counts."""
        self.port = port
        info = TcpInfo()
        try:
            info.open()
            ok = info.listening(port)
        except OSError as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "the kernel shows no byte counters for the listening socket"
        if ok:
            self.info = info
            self.ledger.wire_source = "server"
            log.info("wire bytes: counted by the server from its sockets' TCP_INFO (sock_diag)")
        else:
            info.close()
            self.ledger.wire_source = "client"
            log.warning("wire bytes: the server cannot read its sockets' TCP_INFO through sock_diag (%s); the "
                        "report's wire figures are the workers' own WireReports (summary.wire_source = client)", why)
        return ok

    def _connection(self, key: str) -> Connection | None:
        conn = self.conns.get(key)
        if conn is not None:
            self.conns.move_to_end(key)
            return conn
        peer = parse_peer(key)
        found = self.info.find(self.port, peer) if peer is not None else None
        if found is None:
            return None
        conn = self.conns[key] = Connection(*found)
        if len(self.conns) > MAX_CONNECTIONS:  # forget the oldest that is no client's connection (refused calls)
            current = set(self.client_conn.values())
            old = next((k for k in self.conns if k not in current), None)
            if old is not None:
                del self.conns[old]
        return conn

    def start(self, peer: str) -> Call | None:
        """A call begins on the connection `peer`: the downlink of its previous call is complete.
        None when the server does not count (no sock_diag)."""
        if self.info is None:
            return None
        conn = self._connection(peer)
        now = self.info.read(conn.family, conn.sockid) if conn is not None else None
        renewed = now is None and self.conns.pop(peer, None) is not None
        if renewed:  # that connection is gone: its address may be a new connection's
            conn = self._connection(peer)
            now = self.info.read(conn.family, conn.sockid) if conn is not None else None
        if now is None:
            self.conns.pop(peer, None)
            return Call(None, key=peer, renewed=renewed)
        rx, acked = now
        if conn.pending is not None:  # else what was acked since (a new connection's first bytes, the
            k, j = conn.pending  # reply to a refused call) counts with the next call's reply
            self.ledger.record_measured(k, j, "down", max(0, acked - conn.acked))
            conn.pending, conn.acked = None, max(conn.acked, acked)
        return Call(conn, rx, peer, renewed)

    def uplink(self, call: Call | None, round_: int, client: int, down_round: int, now: bool = False) -> None:
        """The call's request is complete (`now`: read the counters again; else its start's snapshot
        is the end of its request): its up bytes count for (round_, client), its reply's for
        (down_round, client) once the next call of the connection starts."""
        if call is None:
            return
        old = self.client_conn.get(client)
        if call.renewed or (old is not None and old != call.key):  # a new connection: the old one's last
            self.ledger.unmeasured(client, count=False)  # bytes may be lost to the count
        self.client_conn[client] = call.key
        if old is not None and old != call.key and old not in self.client_conn.values():
            self._retire(old)
        conn, rx = call.conn, call.rx
        if conn is not None and now:
            got = self.info.read(conn.family, conn.sockid)
            conn, rx = (conn, got[0]) if got is not None else (None, 0)
        if conn is None:
            self.conns.pop(call.key, None)
            self.ledger.unmeasured(client)
            return
        self.ledger.record_measured(round_, client, "up", max(0, rx - conn.rx))
        conn.rx = max(conn.rx, rx)
        conn.pending = (down_round, client)

    def reply_round(self, call: Call | None, round_: int, client: int) -> None:
        """The call's reply turned out to carry round `round_`'s downlink (cohort runs: the reply is the
        client's next sampled round, known only once it is sent)."""
        if call is None or call.conn is None:
            return
        conn = self.conns.get(call.key)
        if conn is not None and conn.pending is not None and conn.pending[1] == client:
            conn.pending = (round_, client)

    def _retire(self, key: str) -> None:
        """A client moved to another connection: count the reply still pending on the old one if the
        kernel still has it (else its bytes since the last snapshot are lost to the count)."""
        conn = self.conns.pop(key, None)
        got = self.info.read(conn.family, conn.sockid) if conn is not None and conn.pending is not None else None
        if got is not None:
            k, j = conn.pending
            self.ledger.record_measured(k, j, "down", max(0, got[1] - conn.acked))
