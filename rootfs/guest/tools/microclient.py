#!/usr/bin/env python3
"""Host-side tools for the micro guest's TCP service and its disk.

The TCP protocol (docs/micro-guest.md, rootfs/service/src/frame.rs): each request and each
reply is a u32 little-endian length followed by that many bytes of UTF-8 text; requests are
the serial console's commands (`primes 1000`, `get 7`, `put 7 42`, `health`, ...), replies the
serial console's reply lines, both without the trailing newline.

The disk table (rootfs/service/src/table.rs): sector 0 holds the magic b"CLDTABLE", u32 version
1, u32 reserved 0, u64 entry count; entry i is a u64 little-endian at byte 512 + 8*i.

    microclient.py HOST:PORT REQUEST...          send requests on one connection, print replies
    microclient.py mkdisk FILE ENTRIES [MIB]     write a disk image whose entry i is value(i)
"""

import socket
import struct
import sys

MAGIC = b"CLDTABLE"
SECTOR = 512


def value(i):
    """The value `mkdisk` stores in entry i."""
    return ((i + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


def encode(text):
    """One request frame."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    return struct.pack("<I", len(data)) + data


def recv_exact(sock, n):
    """Exactly n bytes from sock (raises EOFError when the connection ends first)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_reply(sock):
    """One reply frame's text."""
    (n,) = struct.unpack("<I", recv_exact(sock, 4))
    return recv_exact(sock, n).decode()


def request(sock, text):
    """Sends one request and returns its reply."""
    sock.sendall(encode(text))
    return read_reply(sock)


def connect(addr, timeout=10.0):
    """A connection to HOST:PORT (a string) or a (host, port) pair."""
    if isinstance(addr, str):
        host, port = addr.rsplit(":", 1)
        addr = (host, int(port))
    return socket.create_connection(addr, timeout=timeout)


def table_image(entries, size_bytes, value_of=value):
    """A disk image holding a table of `entries` entries."""
    head = MAGIC + struct.pack("<IIQ", 1, 0, entries)
    body = b"".join(struct.pack("<Q", value_of(i)) for i in range(entries))
    img = head.ljust(SECTOR, b"\0") + body
    if len(img) > size_bytes:
        raise ValueError("table does not fit the disk")
    return img.ljust(size_bytes, b"\0")


def main(argv):
    if len(argv) >= 3 and argv[0] == "mkdisk":
        mib = int(argv[3]) if len(argv) > 3 else 1
        with open(argv[1], "wb") as f:
            f.write(table_image(int(argv[2]), mib << 20))
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with connect(argv[0]) as s:
        for r in argv[1:]:
            print(request(s, r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
