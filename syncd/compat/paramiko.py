"""paramiko's private state, used in one place: the SSH fast send path and the handshake
timer. Nothing else in syncd reads or writes paramiko's underscore names.

**Fast send** (`DataSender`): bulk CHANNEL_DATA for less CPU, one AES-GCM encryption per
SSH packet and one writev per batch of packets, without paramiko's per-packet Message
objects, copies and polls. OpenSSH servers take at most 32 KiB per packet, so a 1 GiB
upload is 32,768 packets, and paramiko spends about twice this path's CPU building,
padding, copying and locking them on top of the encryption (docs/benchmarks.md). It reads
and updates the Packetizer's name-mangled state, so a sender is handed out only when:
the installed paramiko is one of VERIFIED; every attribute it touches exists; and a
known-answer check passes on the channel's own packetizer types (`self_check`): packets
sealed by this path and by paramiko's `send_message` from one state must carry the same
bytes under the same nonces and leave the same IV, sequence number and counters. A wrong
nonce would not fail loudly: it would reuse AES-GCM nonces, a silent loss of
confidentiality. Otherwise uploads go through paramiko's own path, said once in the log.
Per packet, anything but AES-GCM without compression (a rekey to another cipher, say)
also goes through paramiko's `send_message`.

**Handshake timer** (`drop_handshake_timer`): paramiko cancels its handshake timer after
every packet it reads, for the life of the connection; once the handshake is over a
stand-in that costs nothing takes its place.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from syncd.compat import FeatureOff, installed_version

# Versions whose Packetizer the fast path and the timer stand-in were read against and run
# on (tests/sftp against a real sshd: scripts/test.sh --with paramiko==VERSION tests/sftp).
VERIFIED = ("3.5.0", "3.5.1", "4.0.0", "5.0.0", "5.0.1", "5.1.0")

_MSG_CHANNEL_DATA = 94
_HDR = struct.Struct(">IBBII")   # packet length, padding length, message, channel, data length
_ZEROS = bytes(64)
# Packets per socket write: 8 (~256 KiB) measured best; 16 or 32 doubled the kernel time
# of the sends (1 GiB to loopback sshd: 0.7 -> 1.6 sys-s), 4 was no better than 8.
BATCH = 8
# Private (name-mangled) Packetizer attributes this sender reads or writes.
_WRITE_LOCK = "_Packetizer__write_lock"
_BLOCK_ENGINE_OUT = "_Packetizer__block_engine_out"
_AEAD_OUT = "_Packetizer__aead_out"
_COMPRESS_ENGINE_OUT = "_Packetizer__compress_engine_out"
_BLOCK_SIZE_OUT = "_Packetizer__block_size_out"
_IV_OUT = "_Packetizer__iv_out"
_SEQUENCE_NUMBER_OUT = "_Packetizer__sequence_number_out"
_SENT_BYTES = "_Packetizer__sent_bytes"
_SENT_PACKETS = "_Packetizer__sent_packets"
_NEED_REKEY = "_Packetizer__need_rekey"
_RECEIVED_BYTES_OVERFLOW = "_Packetizer__received_bytes_overflow"
_RECEIVED_PACKETS_OVERFLOW = "_Packetizer__received_packets_overflow"
_KEEPALIVE_LAST = "_Packetizer__keepalive_last"
_NEEDED = (_WRITE_LOCK, _BLOCK_ENGINE_OUT, _AEAD_OUT, _COMPRESS_ENGINE_OUT, _BLOCK_SIZE_OUT,
           _IV_OUT, _SEQUENCE_NUMBER_OUT, _SENT_BYTES, _SENT_PACKETS, _NEED_REKEY,
           _RECEIVED_BYTES_OVERFLOW, _RECEIVED_PACKETS_OVERFLOW, _KEEPALIVE_LAST)


class DataSender:
    """Sends a channel's outgoing data; `send` blocks on flow control like `sendall`.

    Raises EOFError when the channel or the transport is closed, socket.timeout when the
    peer's window stays shut past the channel's timeout (as paramiko does)."""

    def __init__(self, channel: Any):
        self.ch = channel
        self.t = channel.transport
        self.pk = self.t.packetizer
        self.packets = 0   # sent by the fast path (tests check it was used)
        self.direct = 0    # socket writes that went out whole in one writev

    @classmethod
    def for_channel(cls, channel: Any, log: Any = None) -> DataSender | None:
        """A sender for `channel`, or None: then the channel's own sendall carries the
        data. Why it is off is logged once per process (`log`: a structlog logger)."""
        why = fast_send_unusable(channel)
        if why is not None:
            _say_off_once(log, why)
            return None
        return cls(channel)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        ch = self.ch
        mv = memoryview(data).cast("B")
        off, end = 0, len(mv)
        while off < end:
            chunks = []
            with ch.lock:
                if ch.closed:
                    raise EOFError("channel closed")
                # Waits for the peer's window; caps the size at its maximum packet. Then
                # takes whatever more the window allows without waiting, up to BATCH
                # packets: they go out in one socket write.
                size = ch._wait_for_send_window(end - off)
                while size:
                    chunks.append(mv[off:off + size])
                    off += size
                    if off == end or len(chunks) == BATCH or ch.out_window_size == 0:
                        break
                    size = ch._wait_for_send_window(end - off)
            if not chunks:
                raise EOFError("channel closed")
            self._packets(chunks)

    def _clear_to_send(self) -> None:
        """Acquire the transport's send lock once no key exchange is running (what
        paramiko's Transport._send_user_message does; it drops the packet silently on a
        dead transport, this raises)."""
        t = self.t
        start = time.monotonic()
        while True:
            t.clear_to_send.wait(0.1)
            if not t.active:
                raise EOFError("SSH transport closed")
            t.clear_to_send_lock.acquire()
            if t.clear_to_send.is_set():
                return
            t.clear_to_send_lock.release()
            if time.monotonic() > start + t.clear_to_send_timeout:
                raise EOFError("key exchange did not finish")

    def _packets(self, chunks: list[memoryview]) -> None:
        pk = self.pk
        self._clear_to_send()
        try:
            with getattr(pk, _WRITE_LOCK):
                eng = getattr(pk, _BLOCK_ENGINE_OUT)
                if (eng is None or not getattr(pk, _AEAD_OUT)
                        or getattr(pk, _COMPRESS_ENGINE_OUT) is not None):
                    for c in chunks:
                        self._slow(c)
                    return
                iv = getattr(pk, _IV_OUT)
                out, next_iv = seal(eng, iv, getattr(pk, _BLOCK_SIZE_OUT),
                                    self.ch.remote_chanid, chunks)
                setattr(pk, _IV_OUT, next_iv)
                setattr(pk, _SEQUENCE_NUMBER_OUT,
                        (getattr(pk, _SEQUENCE_NUMBER_OUT) + len(chunks)) & 0xFFFFFFFF)
                nbytes = sum(map(len, out))
                self._write(out, nbytes)
                self.packets += len(chunks)
                self._count(nbytes, len(chunks))
        finally:
            self.t.clear_to_send_lock.release()

    def _write(self, parts: list[bytes], nbytes: int) -> None:
        """All of `parts` to the socket, in order. First one writev on the (non-blocking)
        descriptor: no join, and no poll before it, each of which would hand the GIL to
        another thread and back (the socket has a timeout, so Python polls before every
        send). What the kernel did not take goes through paramiko's write_all, which waits
        for room."""
        setattr(self.pk, _KEEPALIVE_LAST, time.time())   # as write_all does
        # The descriptor is asked for at each write, never kept: after a close its number
        # is free, and a kept one could be another file or connection by now.
        fd = self.t.sock.fileno()
        if fd < 0:
            raise EOFError("SSH connection closed")
        try:
            n = os.writev(fd, parts)
        except BlockingIOError:   # EAGAIN (EINTR is retried inside os.writev)
            n = 0
        except OSError as e:   # write_all turns a dead socket into EOFError, so do we
            raise EOFError(f"socket write failed: {e.strerror}") from None
        if n == nbytes:
            self.direct += 1
            return
        i = 0
        while n >= len(parts[i]):   # the parts the kernel took whole are done (n < nbytes)
            n -= len(parts[i])
            i += 1
        self.pk.write_all(memoryview(b"".join(parts[i:]))[n:])

    def _count(self, nbytes: int, npackets: int) -> None:
        """Byte and packet counters, and the rekey trigger, as Packetizer.send_message."""
        pk = self.pk
        sent = getattr(pk, _SENT_BYTES) + nbytes
        packets = getattr(pk, _SENT_PACKETS) + npackets
        setattr(pk, _SENT_BYTES, sent)
        setattr(pk, _SENT_PACKETS, packets)
        if (packets >= pk.REKEY_PACKETS or sent >= pk.REKEY_BYTES) and not getattr(
                pk, _NEED_REKEY):
            setattr(pk, _RECEIVED_BYTES_OVERFLOW, 0)
            setattr(pk, _RECEIVED_PACKETS_OVERFLOW, 0)
            pk._trigger_rekey()

    def _slow(self, chunk: memoryview) -> None:
        """paramiko's own path for a packet this sender does not handle."""
        from paramiko.message import Message

        m = Message()
        m.add_byte(bytes([_MSG_CHANNEL_DATA]))
        m.add_int(self.ch.remote_chanid)
        m.add_string(bytes(chunk))
        self.pk.send_message(m)


def seal(eng: Any, iv: bytes, bsize: int, chan: int, chunks: Sequence[bytes | memoryview]
         ) -> tuple[list[bytes], bytes]:
    """Pure: the wire bytes of one CHANNEL_DATA packet per chunk under AES-GCM (engine
    `eng`, nonce `iv` for the first, counting up as RFC 5647 says), and the next nonce."""
    fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")
    out: list[bytes] = []
    for c in chunks:
        n = len(c) + 9                            # message, channel, length, data
        pad = 3 + bsize - ((n + 4) % bsize)       # as Packetizer._build_packet
        hdr = _HDR.pack(n + pad + 1, pad, _MSG_CHANNEL_DATA, chan, len(c))
        # Zero padding: under GCM the padding is encrypted with a fresh nonce, so its
        # value is never visible (paramiko and OpenSSH do the same for CTR modes).
        out.append(hdr[:4])
        out.append(eng.encrypt(fixed + counter.to_bytes(8, "big"),
                               b"".join((hdr[4:], c, _ZEROS[:pad])), hdr[:4]))
        counter = (counter + 1) & 0xFFFF_FFFF_FFFF_FFFF
    return out, fixed + counter.to_bytes(8, "big")


def fast_send_unusable(channel: Any) -> str | None:
    """Why the fast path may not carry `channel`'s data, or None when it may."""
    version = installed_version("paramiko")
    if version not in VERIFIED:
        return f"paramiko {version} is not one the fast send path was verified on"
    t: Any = getattr(channel, "transport", None)
    pk = getattr(t, "packetizer", None)
    if pk is None or not all(hasattr(pk, a) for a in _NEEDED):
        return "paramiko's packetizer lacks the state the fast send path uses"
    for attr in ("lock", "remote_chanid", "_wait_for_send_window", "closed"):
        if not hasattr(channel, attr):
            return f"paramiko's channel has no {attr}"
    for attr in ("clear_to_send", "clear_to_send_lock", "clear_to_send_timeout", "active"):
        if not hasattr(t, attr):
            return f"paramiko's transport has no {attr}"
    try:
        if t.sock.fileno() < 0:
            return "the connection is closed"
    except (AttributeError, OSError):
        return "the connection has no socket"
    if not (hasattr(pk, "write_all") and hasattr(pk, "send_message")
            and hasattr(pk, "_trigger_rekey") and isinstance(getattr(pk, _WRITE_LOCK),
                                                             type(threading.RLock()))):
        return "paramiko's packetizer lacks the methods the fast send path uses"
    return self_check(type(pk))


class _Capture:
    """A socket that keeps what is sent (for a Packetizer under test)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def send(self, b: bytes) -> int:
        self.data += b
        return len(b)

    def settimeout(self, _t: float | None) -> None:
        pass


def self_check(packetizer_cls: Any) -> str | None:
    """Known-answer check of the fast path against paramiko's own, on a packetizer of
    `packetizer_cls` (the connection's) with a fresh key: two CHANNEL_DATA packets sealed
    both ways from one state must carry the same plaintext under the same nonces (each
    decrypts with the nonce this path expects), and leave the same IV, sequence number and
    byte and packet counters. Returns what differs, or None."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from paramiko.message import Message

        key, iv0 = os.urandom(16), os.urandom(4) + (2**63 + 255).to_bytes(8, "big")
        eng, seq0, chan, bsize = AESGCM(key), 0xFFFFFFFF, 7, 16   # the sequence wraps
        chunks = [os.urandom(100), os.urandom(33)]
        sock = _Capture()
        pk = packetizer_cls(sock)
        pk.set_outbound_cipher(eng, bsize, None, 16, None, aead=True, iv_out=iv0)
        if getattr(pk, _IV_OUT) != iv0 or getattr(pk, _BLOCK_ENGINE_OUT) is not eng:
            return "paramiko's outbound cipher state is not where the fast path reads it"
        setattr(pk, _SEQUENCE_NUMBER_OUT, seq0)
        pk._initial_kex_done = True
        bytes0, packets0 = getattr(pk, _SENT_BYTES), getattr(pk, _SENT_PACKETS)
        for c in chunks:
            m = Message()
            m.add_byte(bytes([_MSG_CHANNEL_DATA]))
            m.add_int(chan)
            m.add_string(c)
            pk.send_message(m)
        theirs = bytes(sock.data)
        ours, next_iv = seal(eng, iv0, bsize, chan, chunks)
        if len(theirs) != sum(map(len, ours)):
            return "paramiko's packets differ in length from the fast path's"
        return (_compare(eng, theirs, ours, iv0)
                or _state_diff(pk, next_iv, (seq0 + 2) & 0xFFFFFFFF,
                               getattr(pk, _SENT_BYTES) - bytes0, len(theirs),
                               getattr(pk, _SENT_PACKETS) - packets0))
    except Exception as e:   # any surprise in paramiko's internals: the fast path is off
        return f"the fast send path's self-check failed: {type(e).__name__}: {e}"


def _compare(eng: Any, theirs: bytes, ours: list[bytes], iv: bytes) -> str | None:
    """Each packet of `theirs` decrypts under the nonce `ours` used, to the same
    plaintext but for the random padding paramiko draws."""
    fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")
    off = 0
    for length, sealed in zip(ours[::2], ours[1::2], strict=True):
        nonce = fixed + counter.to_bytes(8, "big")
        their_len, their_sealed = theirs[off:off + 4], theirs[off + 4:off + 4 + len(sealed)]
        off += 4 + len(sealed)
        if their_len != length:
            return "paramiko's packet length differs from the fast path's"
        try:
            a = eng.decrypt(nonce, their_sealed, their_len)
        except Exception:
            return "paramiko's packet is not sealed under the nonce the fast path uses"
        try:
            b = eng.decrypt(nonce, sealed, length)
        except Exception:
            return "the fast path's packet is not sealed under the nonce paramiko uses"
        pad = b[0]
        if a[0] != pad or a[:len(a) - pad] != b[:len(b) - pad]:
            return "paramiko's packet carries other bytes than the fast path's"
        counter = (counter + 1) & 0xFFFF_FFFF_FFFF_FFFF
    return None


def _state_diff(pk: Any, next_iv: bytes, next_seq: int, sent: int, nbytes: int,
                packets: int) -> str | None:
    if getattr(pk, _IV_OUT) != next_iv:
        return "paramiko's next nonce differs from the fast path's"
    if getattr(pk, _SEQUENCE_NUMBER_OUT) != next_seq:
        return "paramiko's next sequence number differs from the fast path's"
    if (sent, packets) != (nbytes, 2):
        return "paramiko counts sent bytes or packets otherwise than the fast path"
    return None


_off_said: set[str] = set()


def _say_off_once(log: Any, why: str) -> None:
    if log is None or why in _off_said or why.startswith("the connection"):
        return
    _off_said.add(why)
    FeatureOff("paramiko", installed_version("paramiko"), "ssh_fast_send",
               f"{why}: uploads go through paramiko's own packet path (correct, "
               "about twice the CPU per byte)",
               "install a verified paramiko: pip install -r requirements/run.lock"
               ).log(log)


class _SpentTimer:
    """Stands in for paramiko's handshake timer once the handshake is over: cancel() is
    free. Not None: paramiko's transport thread reads the attribute twice in
    complete_handshake, and a stand-in cannot go missing between the two reads."""

    def cancel(self) -> None:
        pass


def drop_handshake_timer(t: Any) -> None:
    """paramiko calls Packetizer.complete_handshake after every packet it reads, and that
    cancels the handshake timer again each time (a lock and an Event per packet: ~3% of
    the Python time of an upload). Once the handshake is complete the timer has no use,
    and handshake_timed_out() says False whatever stands in its place. Only on VERIFIED
    versions: elsewhere the timer is left alone (a few percent of CPU, nothing else)."""
    if installed_version("paramiko") not in VERIFIED:
        return
    pk: Any = getattr(t, "packetizer", None)
    if (getattr(pk, "_Packetizer__handshake_complete", False)
            and isinstance(getattr(pk, "_Packetizer__timer", None), threading.Timer)):
        pk._Packetizer__timer = _SpentTimer()
