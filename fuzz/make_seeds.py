#!/usr/bin/env python3
"""Regenerates the seed inputs in fuzz/seeds/.

    cargo build --release --bins && cargo xtask guest   # the tools, from the repository root
    python3 fuzz/make_seeds.py                           # all seeds
    python3 fuzz/make_seeds.py --no-tools                # only the crafted ones (no KVM needed)

overlay_open, state_file and update_artifact seeds are real files made by the tools (two bases, one with a
virtio disk and NIC; overlays built with `image-builder overlay --script`, one with a disk δ;
the bases' machine states), plus one
overlay derived from a real one whose index also has a zero run, a base copy and a self copy
(the tools only produce those for workloads the micro guest does not have). The derived
overlay keeps valid CRCs and XXH3s, so `image-builder info` accepts it.

virtio_queue, usernet_frames and api_frame seeds are crafted here: well-formed virtio-blk requests and
virtio-net chains in the memory layout `vmm::devices::virtio::fuzz::fuzz_process` expects, and
Ethernet frames (ARP, DHCP, TCP SYN, ping) with correct checksums in the `u16 BE length +
frame` records `netback::fuzz_frames` reads, and control-socket frames for api_frame.
"""

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEEDS = os.path.join(HERE, "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    print(f"  seeds/{target}/{name}: {len(data)} bytes")


# ---------------------------------------------------------------------------------------------
# CRC-64/XZ (the overlay header and index checksum) and postcard varints.

def _crc64_table():
    poly = 0xC96C5795D7870F42  # reflected 0x42F0E1EBA9EA3693
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


CRC64_TABLE = _crc64_table()


def crc64_xz(data):
    c = 0xFFFFFFFFFFFFFFFF
    for b in data:
        c = CRC64_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFFFFFFFFFF


assert crc64_xz(b"123456789") == 0x995DC9BBDF1939FA


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def varint(self):
        n, shift = 0, 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def bytes(self, n):
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


# ---------------------------------------------------------------------------------------------
# Overlays: the postcard `Index` of format/src/overlay/index.rs.

def decode_index(raw):
    r = Reader(raw)
    ix = {"mem_pages": r.varint()}
    ix["zero"] = [(r.varint(), r.varint()) for _ in range(r.varint())]
    ix["base_copies"] = [(r.varint(), r.varint()) for _ in range(r.varint())]
    chunks = []
    for _ in range(r.varint()):
        offset, length, xxh3 = r.varint(), r.varint(), r.varint()
        pages = [(r.varint(), r.varint()) for _ in range(r.varint())]
        chunks.append((offset, length, xxh3, pages))
    ix["chunks"] = chunks
    ix["self_copies"] = [(r.varint(), r.varint()) for _ in range(r.varint())]
    ix["disk_bytes"] = r.varint()
    ix["disk_chunks"] = chunks = []
    for _ in range(r.varint()):
        offset, length, xxh3 = r.varint(), r.varint(), r.varint()
        blocks = [(r.varint(), r.varint()) for _ in range(r.varint())]
        chunks.append((offset, length, xxh3, blocks))
    ix["state"] = r.bytes(r.varint())
    ix["stats"] = [r.varint() for _ in range(8)]
    assert r.pos == len(raw), "index has trailing bytes: format changed?"
    return ix


def encode_index(ix):
    pairs = lambda v: varint(len(v)) + b"".join(varint(a) + varint(b) for a, b in v)
    out = varint(ix["mem_pages"]) + pairs(ix["zero"]) + pairs(ix["base_copies"])
    chunks = lambda v: varint(len(v)) + b"".join(
        varint(offset) + varint(length) + varint(xxh3) + pairs(runs) for offset, length, xxh3, runs in v)
    out += chunks(ix["chunks"]) + pairs(ix["self_copies"])
    out += varint(ix["disk_bytes"]) + chunks(ix["disk_chunks"])
    out += varint(len(ix["state"])) + ix["state"]
    out += b"".join(varint(s) for s in ix["stats"])
    return out


def derive_overlay(real):
    """A real overlay with a zero run, a base copy and a self copy added to its index."""
    assert real[:8] == b"CLDOVRLY" and struct.unpack_from("<H", real, 8)[0] == 2
    index_off, index_len = struct.unpack_from("<QQ", real, 44)
    ix = decode_index(real[index_off:index_off + index_len])
    written = sorted(p for c in ix["chunks"] for first, n in c[3] for p in range(first, first + n))
    taken = set(written)
    # Four of the highest pages no chunk writes: a base copy, a two-page zero run, a self copy.
    free = [p for p in range(ix["mem_pages"] - 1, 0, -1) if p not in taken][:4]
    zero_run = (free[2], 2) if free[2] + 1 == free[1] else (free[1], 1)
    ix["zero"] = ix["zero"] + [zero_run]
    ix["base_copies"] = ix["base_copies"] + [(free[0], 0)]
    ix["self_copies"] = ix["self_copies"] + [(free[3], written[0])]
    stats = ix["stats"]  # pages, same, zero, base_dedup, self_dedup, data, compressed_bytes, disk_blocks
    stats[1] -= zero_run[1] + 2
    stats[2] += zero_run[1]
    stats[3] += 1
    stats[4] += 1
    raw = encode_index(ix)
    head = bytearray(real[:76])
    struct.pack_into("<QQQ", head, 44, index_off, len(raw), crc64_xz(raw))
    struct.pack_into("<Q", head, 68, crc64_xz(bytes(head[:68])))
    return bytes(head) + real[76:index_off] + raw


# ---------------------------------------------------------------------------------------------
# Real files from the tools.

def run(*args):
    print("  $", " ".join(args))
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def tool_seeds(tmp):
    ib = os.path.join(ROOT, "target/release/image-builder")
    guest = os.path.join(ROOT, "target/guest/micro-guest")
    for f in (ib, guest):
        if not os.path.exists(f):
            sys.exit(f"{f} is missing: run `cargo build --release --bins && cargo xtask guest`")
    base = os.path.join(tmp, "base")
    run(ib, "base", "--kernel", guest, "--out", base)
    overlays = {
        # name: (script, extra options)
        "primes.overlay": ("primes:10", []),
        "echo-2chunks.overlay": ("echo:seed", ["--chunk-pages", "2"]),
        "load1.overlay": ("load:1", []),  # the 1 MiB δ of the sample application's model
    }
    for name, (script, extra) in overlays.items():
        out = os.path.join(tmp, name)
        run(ib, "overlay", "--base", base, "--script", script, "--out", out, *extra)
        with open(out, "rb") as f:
            write("overlay_open", name, f.read())
    with open(os.path.join(tmp, "primes.overlay"), "rb") as f:
        derived = derive_overlay(f.read())
    out = os.path.join(tmp, "copies.overlay")
    with open(out, "wb") as f:
        f.write(derived)
    run(ib, "info", out)  # the derived overlay is a valid one
    write("overlay_open", "copies.overlay", derived)
    with open(os.path.join(base, "state"), "rb") as f:
        write("state_file", "base.state", f.read())

    # A base with a virtio disk (holding the micro guest's table) and a NIC: its state has
    # virtio device states, and an overlay that writes the table carries a disk δ.
    disk = os.path.join(tmp, "table.img")
    with open(disk, "wb") as f:
        f.write(table_image(16))
    dbase = os.path.join(tmp, "base-disk-net")
    run(ib, "base", "--kernel", guest, "--disk", disk, "--net", "--out", dbase)
    out = os.path.join(tmp, "disk-delta.overlay")
    run(ib, "overlay", "--base", dbase, "--script", "put:3:99,primes:10", "--out", out)
    with open(out, "rb") as f:
        write("overlay_open", "disk-delta.overlay", f.read())
    with open(os.path.join(dbase, "state"), "rb") as f:
        write("state_file", "virtio.state", f.read())

    # An update artifact: a mostly-zero "root", a kernel and an initrd, packed by the updater.
    up = os.path.join(ROOT, "target/release/cloudlet-update")
    if not os.path.exists(up):
        sys.exit(f"{up} is missing: run `cargo build --release --bins`")
    root = bytearray(300000)
    root[1024:1043] = b"ext4-ish superblock"
    parts = {"root": bytes(root), "k": b"kernel", "i": b"initrd"}
    for name, data in parts.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    out = os.path.join(tmp, "small.cup")
    run(up, "pack", "--board", "dev", "--generation", "200", "--version", "0.2.0",
        "--root", os.path.join(tmp, "root"), "--kernel", os.path.join(tmp, "k"),
        "--initrd", os.path.join(tmp, "i"), "-o", out)
    with open(out, "rb") as f:
        write("update_artifact", "small.cup", f.read())

    # A base with a virtio console: its state has a console device (and its pending input).
    cbase = os.path.join(tmp, "base-console")
    run(ib, "base", "--kernel", guest, "--console", "--out", cbase)
    with open(os.path.join(cbase, "state"), "rb") as f:
        write("state_file", "console.state", f.read())


def table_image(entries):
    """A 64 KiB disk with the micro guest's table (rootfs/service/src/table.rs)."""
    img = bytearray(64 * 1024)
    struct.pack_into("<8sIIQ", img, 0, b"CLDTABLE", 1, 0, entries)
    for i in range(entries):
        struct.pack_into("<Q", img, 512 + 8 * i, (i + 1) * 0x9E3779B97F4A7C15 % 2**64)
    return bytes(img)


# ---------------------------------------------------------------------------------------------
# Ethernet frames for the user-mode network.

GUEST_MAC = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
GW_MAC = bytes([0x52, 0x55, 0x0A, 0x00, 0x02, 0x02])
BCAST = b"\xff" * 6
GUEST_IP = socket.inet_aton("10.0.2.15")
GW_IP = socket.inet_aton("10.0.2.2")
ANY = socket.inet_aton("0.0.0.0")
ALL = socket.inet_aton("255.255.255.255")


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst, ethertype, payload):
    return dst + GUEST_MAC + struct.pack("!H", ethertype) + payload


def ipv4(src, dst, proto, payload, ident=1):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, src, dst)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def l4_csum(src, dst, proto, segment):
    return csum(src + dst + struct.pack("!BBH", 0, proto, len(segment)) + segment)


def udp(src, dst, sport, dport, payload):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = l4_csum(src, dst, 17, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def tcp_syn(src, dst, sport, dport, seq):
    opts = struct.pack("!BBH", 2, 4, 1460) + bytes([1, 3, 3, 7])  # MSS 1460, NOP, WS 7
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, (20 + len(opts)) // 4 << 4, 0x02, 64240, 0, 0) + opts
    c = l4_csum(src, dst, 6, seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def arp_request():
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, b"\0" * 6, GW_IP)
    return eth(BCAST, 0x0806, body)


def dhcp(msg_type, xid, extra_opts=b""):
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, ANY, ANY, ANY, ANY,
                        GUEST_MAC + b"\0" * 10, b"", b"")
    opts = b"\x63\x82\x53\x63" + bytes([53, 1, msg_type]) + extra_opts + bytes([55, 3, 1, 3, 6, 255])
    return eth(BCAST, 0x0800, ipv4(ANY, ALL, 17, udp(ANY, ALL, 68, 67, bootp + opts)))


def dhcp_discover():
    return dhcp(1, 0x3903F326)


def dhcp_request():
    return dhcp(3, 0x3903F326, bytes([50, 4]) + GUEST_IP + bytes([54, 4]) + GW_IP)


def syn_to_gateway(port=80):
    return eth(GW_MAC, 0x0800, ipv4(GUEST_IP, GW_IP, 6, tcp_syn(GUEST_IP, GW_IP, 40000, port, 0x1000), ident=2))


def ping_gateway():
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"cloudlet-fuzz-seed"
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    return eth(GW_MAC, 0x0800, ipv4(GUEST_IP, GW_IP, 1, icmp, ident=3))


def udp_to_gateway():
    return eth(GW_MAC, 0x0800, ipv4(GUEST_IP, GW_IP, 17, udp(GUEST_IP, GW_IP, 5353, 53, b"\x12\x34\x01\x00\x00\x01\0\0\0\0\0\0\x07example\x03com\0\0\x01\0\x01"), ident=4))


def records(*frames):
    return b"".join(struct.pack("!H", len(f)) + f for f in frames)


def usernet_seeds():
    write("usernet_frames", "arp.bin", records(arp_request()))
    write("usernet_frames", "dhcp-discover.bin", records(dhcp_discover()))
    write("usernet_frames", "tcp-syn.bin", records(syn_to_gateway()))
    # A guest coming up: DHCP, ARP for the gateway, ping, a DNS query, a connection attempt.
    write("usernet_frames", "session.bin", records(
        dhcp_discover(), dhcp_request(), arp_request(), ping_gateway(), udp_to_gateway(),
        syn_to_gateway(80), syn_to_gateway(22)))


# ---------------------------------------------------------------------------------------------
# Guest memory for `fuzz_process`: 6 head bytes, then memory from address 0 (descriptor table
# at 0, available ring at 0x1000, used ring at 0x2000; network RX queue the same at 0x3000).

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class Memory:
    def __init__(self):
        self.mem = bytearray()

    def put(self, addr, data):
        if len(self.mem) < addr + len(data):
            self.mem.extend(b"\0" * (addr + len(data) - len(self.mem)))
        self.mem[addr:addr + len(data)] = data

    def descs(self, table, descs):
        """descs: [(addr, len, flags, next)] written from `table`."""
        self.put(table, b"".join(struct.pack("<QIHH", *d) for d in descs))

    def avail(self, ring, heads):
        self.put(ring, struct.pack(f"<HH{len(heads)}H", 0, len(heads), *heads))


def head(size_log2, next_avail=0, next_used=0, read_only=False, frames=0):
    return struct.pack("<BHHB", size_log2, next_avail, next_used, frames << 1 | int(read_only))


def blk_req(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def virtio_seeds():
    T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
    # Block requests (the same memory is also run as a network TX queue; those chains are
    # refused there, which is fine).
    m = Memory()
    m.put(0x400, blk_req(T_OUT, 1))
    m.put(0x410, blk_req(T_IN, 1))
    m.put(0x420, blk_req(T_FLUSH, 0))
    m.put(0x430, blk_req(T_GET_ID, 0))
    m.put(0x450, blk_req(T_IN, 0))
    m.put(0x600, bytes(range(256)) * 2)  # the sector OUT writes
    m.descs(0, [
        (0x400, 16, F_NEXT, 1), (0x600, 512, F_NEXT, 2), (0x440, 1, F_WRITE, 0),        # OUT, 512 B
        (0x410, 16, F_NEXT, 4), (0x6000, 256, F_WRITE | F_NEXT, 5),                     # IN, 2 bufs
        (0x6100, 256, F_WRITE | F_NEXT, 6), (0x441, 1, F_WRITE, 0),
        (0x420, 16, F_NEXT, 8), (0x442, 1, F_WRITE, 0),                                 # FLUSH
        (0x430, 16, F_NEXT, 10), (0x6200, 20, F_WRITE | F_NEXT, 11), (0x443, 1, F_WRITE, 0),  # GET_ID
        (0x500, 48, F_INDIRECT, 0),                                                     # IN, indirect
    ])
    m.descs(0x500, [(0x450, 16, F_NEXT, 1), (0x6300, 512, F_WRITE | F_NEXT, 2), (0x444, 1, F_WRITE, 0)])
    m.avail(0x1000, [0, 3, 7, 9, 12])
    write("virtio_queue", "blk.bin", head(4) + bytes(m.mem))

    # Network: two TX chains (ARP in one buffer; header and SYN in two), four RX buffers, and
    # four frames offered by the backend (sliced from this memory by fuzz_process).
    m = Memory()
    hdr = bytes(12)
    arp, syn = arp_request(), syn_to_gateway()
    m.put(0x200, hdr + arp)
    m.put(0x300, hdr)
    m.put(0x400, syn)
    m.descs(0, [(0x200, 12 + len(arp), 0, 0), (0x300, 12, F_NEXT, 2), (0x400, len(syn), 0, 0)])
    m.avail(0x1000, [0, 1])
    m.descs(0x3000, [(0x8000 + i * 0x800, 0x800, F_WRITE, 0) for i in range(4)])
    m.avail(0x4000, [0, 1, 2, 3])
    write("virtio_queue", "net.bin", head(4, frames=4) + bytes(m.mem))


# ---------------------------------------------------------------------------------------------
# Control-socket frames (vmm/src/api.rs): u32 LE length, u16 LE protocol version 1, postcard
# `ApiRequest` (variant index, then fields).

def api_frame(body):
    payload = struct.pack("<H", 1) + body
    return struct.pack("<I", len(payload)) + payload


def api_seeds():
    snap_dir = b"/run/cloudlet/snap"
    snapshot = varint(3) + varint(len(snap_dir)) + snap_dir + b"\x01"  # Snapshot { dir, resume: true }
    write("api_frame", "requests.bin", b"".join(api_frame(b) for b in (
        varint(0), varint(1), snapshot, varint(2), varint(4))))  # Status, Pause, Snapshot, Resume, Stop


# The handoff stream (format/src/handoff.rs): a preamble, then frames (u32 wire length, kind,
# codec, 2 reserved, u32 raw length, u32 sequence, body, XXH3-64). The checksums are zero here:
# the fuzz build skips them (cfg(fuzzing)) so that mutations reach the decoders.

def handoff_frame(seq, kind, body):
    return (struct.pack("<IBBHII", len(body), kind, 0, 0, len(body), seq) + body
            + b"\0" * 8)


def handoff_seeds():
    preamble = b"CLDHANDO" + struct.pack("<HH", 1, 0) + b"\xab" * 32 + b"\x5a" * 32 + b"\0" * 8
    start = varint(64) + varint(1) + varint(0)                      # Start { 64 MiB, 1 vCPU, no disk }
    runs = varint(3) + (varint(3) + varint(2) + varint(0)           # [3, +2) Data
                        + varint(10) + varint(5) + varint(1)        # [10, +5) Zero
                        + varint(30) + varint(2) + varint(4) + varint(3))  # [30, +2) Copy(3)
    pages = struct.pack("<I", len(runs)) + runs + bytes(range(256)) * 32
    disk = struct.pack("<Q", 7) + b"\x07" * 4096
    complete = varint(1) + varint(1)
    frames = [(1, start), (2, pages), (3, disk), (4, b"CLDSTATE"), (5, complete)]
    write("handoff_stream", "stream.bin", preamble + b"".join(
        handoff_frame(i, k, b) for i, (k, b) in enumerate(frames)))
    refusal = varint(0) + varint(12) + b"no such base"
    write("handoff_stream", "answers.bin", handoff_frame(0, 16, b"")
          + handoff_frame(1, 18, varint(812)) + handoff_frame(2, 19, varint(3) + varint(2) + b"no"))
    write("handoff_stream", "refusal.bin", handoff_frame(0, 17, refusal))


# Pairing frames (format/src/pairing.rs): "CLPR", u16 version 1, kind, reserved 0, u32 body
# length, body, CRC-32 (zlib's; real values here, though the fuzz build skips the check).

def pairing_frame(kind, body):
    head = b"CLPR" + struct.pack("<HBBI", 1, kind, 0, len(body))
    return head + body + struct.pack("<I", zlib.crc32(head + body))


def pstr(s):
    return struct.pack("<H", len(s)) + s


def pairing_seeds():
    nonce = bytes([16]) + bytes(range(16))
    challenge = pairing_frame(1, nonce + pstr(b"482913"))
    hello = pairing_frame(2, nonce + pstr(b"phone-1") + pstr(b"Ana's phone") + pstr(b"Pixel 8"))
    welcome = pairing_frame(3, pstr(b"0123456789ab") + bytes([2]) + pstr(b"https://10.0.0.1:9999")
                            + pstr(b"https://[fe80::1]:9999") + b"\x07" * 32 + pstr(b"s" * 64)
                            + struct.pack("<Q", 1800000000) + b"\x01" + pstr(b"cloudlet")
                            + pstr(b"correct horse"))
    refusal = pairing_frame(4, struct.pack("<H", 1) + pstr(b"no pairing window is open"))
    write("pairing_frames", "usb-session.bin", challenge + hello + welcome)
    write("pairing_frames", "hello.bin", hello)
    write("pairing_frames", "refusal.bin", refusal)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-tools", action="store_true",
                    help="only the crafted seeds (virtio_queue, usernet_frames, api_frame, handoff_stream, pairing_frames)")
    args = ap.parse_args()
    if not args.no_tools:
        for t in ("overlay_open", "state_file", "update_artifact"):
            shutil.rmtree(os.path.join(SEEDS, t), ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
            tool_seeds(tmp)
    for t in ("virtio_queue", "usernet_frames", "api_frame", "handoff_stream", "pairing_frames"):
        shutil.rmtree(os.path.join(SEEDS, t), ignore_errors=True)
    virtio_seeds()
    usernet_seeds()
    api_seeds()
    handoff_seeds()
    pairing_seeds()


if __name__ == "__main__":
    main()
