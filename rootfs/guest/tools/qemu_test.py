#!/usr/bin/env python3
"""Checks the micro guest's disk and TCP service under QEMU microvm (virtio-mmio, modern
transport, user networking with a host port forwarded to the guest's port 80).

    qemu_test.py [--guest ELF] [--tcg] [--lines pic|ioapic] [--console] [--port N]

--lines pic (default): `acpi=off`, so QEMU puts the devices on 8259 lines (11, 12) and appends
their `virtio_mmio.device=` entries to the command line itself. --lines ioapic: the same
windows announced with lines 24+ (only an IOAPIC has those), so the guest must poll.
--console: the guest also gets a virtio console (QEMU's virtio-serial, which acts as a
single-port console since the guest declines MULTIPORT) on a Unix socket; the banner and the
serial-protocol checks then go through it, and COM1 must stay silent.
Exits non-zero with a message on the first failed check.
"""

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import microclient  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ENTRIES = 5000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lines:
    """Lines of text read from a byte stream by a background thread."""

    def __init__(self, read):
        self.lines = []
        self.closed = False
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(read,), daemon=True).start()

    def _read(self, read):
        buf = b""
        while True:
            try:
                chunk = read()
            except OSError:
                chunk = b""
            with self.cond:
                if not chunk:
                    self.closed = True
                    self.cond.notify_all()
                    return
                buf += chunk
                *done, buf = buf.split(b"\n")
                for raw in done:
                    self.lines.append(raw.decode(errors="replace").rstrip("\r"))
                self.cond.notify_all()

    def expect(self, pred, timeout, what):
        end = time.time() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                left = end - time.time()
                if left <= 0 or self.closed:
                    raise AssertionError(f"no matching {what} line; saw {self.lines}")
                self.cond.wait(left)


class Guest:
    """A QEMU process running the guest; the output of its console (COM1, or the virtio
    console with --console) collected line by line."""

    def __init__(self, args, disk, host_port, extra_append=""):
        machine = "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off"
        append = "console=ttyS0 " + extra_append
        if args.lines == "ioapic":
            machine += ",auto-kernel-cmdline=off"
            # QEMU's transports: index 31 at 0xfeb00000 + 31 * 512 gets the first device.
            append += (
                " virtio_mmio.device=512@0xfeb00e00:36 virtio_mmio.device=512@0xfeb00c00:35"
            )
            if args.console:
                append += " virtio_mmio.device=512@0xfeb00a00:37"
        accel = ["-accel", "tcg"] if args.tcg else ["-enable-kvm", "-cpu", "host,+invtsc"]
        cmd = [
            "qemu-system-x86_64", "-M", machine, *accel, "-m", "128", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0x501,iosize=2",
            "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"id=d0,file={disk},if=none,format=raw",
            "-device", "virtio-blk-device,drive=d0",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{host_port}-:80",
            "-device", "virtio-net-device,netdev=n0",
            "-kernel", args.guest, "-append", append.strip(),
        ]
        sock_path = None
        if args.console:
            sock_path = os.path.join(tempfile.mkdtemp(), "console.sock")
            # QEMU waits for our connection before it starts the guest: no output is lost.
            cmd += [
                "-device", "virtio-serial-device",
                "-chardev", f"socket,id=c0,path={sock_path},server=on,wait=on",
                "-device", "virtconsole,chardev=c0",
            ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.com1 = Lines(self.proc.stdout.read1)
        self.sock = None
        self.console = self.com1
        if sock_path:
            end = time.time() + 30
            while self.sock is None:
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(sock_path)
                    self.sock = s
                except OSError:
                    s.close()
                    if time.time() > end or self.proc.poll() is not None:
                        raise AssertionError("QEMU's console socket never appeared")
                    time.sleep(0.05)
            self.console = Lines(lambda: self.sock.recv(65536))

    @property
    def lines(self):
        """The console's lines so far."""
        return self.console.lines

    def expect(self, pred, timeout=30):
        return self.console.expect(pred, timeout, "console")

    def send(self, text):
        if self.sock:
            self.sock.sendall(text.encode())
        else:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.sock:
            self.sock.close()


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def connect_retry(port, timeout=30):
    end = time.time() + timeout
    while True:
        try:
            s = microclient.connect(("127.0.0.1", port))
            if microclient.request(s, "health") == "ok health":
                return s
            s.close()
        except (OSError, EOFError):
            pass
        if time.time() > end:
            raise AssertionError("the guest's TCP service never answered")
        time.sleep(0.2)


def run(args):
    tmp = tempfile.mkdtemp()
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.write(microclient.table_image(ENTRIES, 1 << 20))
    port = args.port or free_port()
    g = Guest(args, disk, port)
    try:
        banner = g.expect(lambda l: l.startswith("micro-guest "))
        check(g.lines[0] == banner, f"banner first: {banner}")
        t0 = time.time()
        s = connect_retry(port)
        print(f"   first answer {1000 * (time.time() - t0):.0f} ms after the banner")
        r = microclient.request(s, "primes 1000000")
        check("count=78498" in r.split(), f"primes over TCP: {r}")
        check(microclient.request(s, "echo héllo wörld") == "ok echo héllo wörld", "echo UTF-8")
        r = microclient.request(s, "disk")
        check(r == f"ok disk sectors=2048 ro=0 magic=CLDTABLE entries={ENTRIES}", r)
        r = microclient.request(s, "net")
        check(r.startswith("ok net mac=52:54:00:12:34:56 ip=10.0.2.15/24 port=80"), r)
        for i in (0, 1, 63, 64, 511, 512, 4095, ENTRIES - 1):
            r = microclient.request(s, f"get {i}")
            check(r == f"ok get i={i} value={microclient.value(i)}", r)
        r = microclient.request(s, f"get {ENTRIES}")
        check(r.startswith("err get"), r)
        for i, v in ((7, 42), (4096, 2**64 - 1), (ENTRIES - 1, 0)):
            r = microclient.request(s, f"put {i} {v}")
            check(r == f"ok put i={i} value={v}", r)
            check(microclient.request(s, f"get {i}") == f"ok get i={i} value={v}", "get after put")
        check(microclient.request(s, "frob").startswith("err unknown command 'frob'"), "err")
        # Pipelined: several requests in one send, answered in order.
        s.sendall(b"".join(microclient.encode(f"echo {k}") for k in range(20)))
        replies = [microclient.read_reply(s) for _ in range(20)]
        check(replies == [f"ok echo {k}" for k in range(20)], "pipelined requests in order")
        # A request split across segments.
        frame = microclient.encode("echo split")
        s.sendall(frame[:2])
        time.sleep(0.05)
        s.sendall(frame[2:7])
        time.sleep(0.05)
        s.sendall(frame[7:])
        check(microclient.read_reply(s) == "ok echo split", "request split across segments")
        long_echo = "echo " + "x" * 1019
        check(microclient.request(s, long_echo) == "ok " + long_echo, "1024-byte request")
        s.close()

        # Too long: an error reply, then the guest closes the connection.
        with microclient.connect(("127.0.0.1", port)) as t:
            t.sendall(microclient.encode("echo " + "y" * 2000))
            r = microclient.read_reply(t)
            check(r == "err request too long (at most 1024 bytes)", r)
            check(t.recv(16) == b"", "connection closed after a too-long request")

        # Concurrent connections: 20 clients, each holding its connection open across requests.
        def client(k):
            with microclient.connect(("127.0.0.1", port)) as c:
                out = []
                for j in range(5):
                    out.append(microclient.request(c, f"echo c{k} r{j}"))
                    out.append(microclient.request(c, f"get {k * 97 % ENTRIES}"))
                    time.sleep(0.01)
                return k, out

        barrier_conns = [microclient.connect(("127.0.0.1", port)) for _ in range(16)]
        for k, c in enumerate(barrier_conns):
            c.sendall(microclient.encode(f"echo held {k}"))
        held = [microclient.read_reply(c) for c in barrier_conns]
        check(held == [f"ok echo held {k}" for k in range(16)], "16 connections open at once")
        for c in barrier_conns:
            c.close()
        with concurrent.futures.ThreadPoolExecutor(20) as ex:
            results = list(ex.map(client, range(20)))
        for k, out in results:
            want = []
            for j in range(5):
                i = k * 97 % ENTRIES
                v = 42 if i == 7 else microclient.value(i)
                want += [f"ok echo c{k} r{j}", f"ok get i={i} value={v}"]
            if out != want:
                raise AssertionError(f"client {k}: {out} != {want}")
        check(True, "20 concurrent clients x 10 requests")

        # More clients than sockets: the extra ones are refused (reset) or wait; clients that
        # vanish mid-request (reset) do no harm; afterwards everything is served again.
        crowd = []
        for k in range(40):
            try:
                c = microclient.connect(("127.0.0.1", port), timeout=5)
                c.sendall(microclient.encode(f"echo crowd {k}")[:6])
                crowd.append(c)
            except OSError:
                pass
        for c in crowd:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            c.close()
        time.sleep(0.2)
        with microclient.connect(("127.0.0.1", port)) as c:
            check(microclient.request(c, "health") == "ok health", "served again after a crowd")

        # Many sequential connections.
        t0 = time.time()
        for k in range(300):
            with microclient.connect(("127.0.0.1", port)) as c:
                r = microclient.request(c, f"primes {k}")
                if not r.startswith(f"ok primes N={k} count="):
                    raise AssertionError(r)
        dt = time.time() - t0
        check(True, f"300 sequential connections ({1000 * dt / 300:.1f} ms each)")

        # Latency of one request on an open connection.
        with microclient.connect(("127.0.0.1", port)) as c:
            microclient.request(c, "health")
            t0 = time.time()
            for _ in range(200):
                microclient.request(c, "health")
            print(f"   request round trip {1e6 * (time.time() - t0) / 200:.0f} us")

        # The console (COM1, or the virtio console) still works alongside, and stats counts
        # everything.
        g.send("echo serial\n")
        check(g.expect(lambda l: l.startswith("ok echo")) == "ok echo serial", "serial echo")
        seen = len(g.lines)
        g.send("".join(f"echo p{k}\r\n" for k in range(100)))
        g.expect(lambda l: l == "ok echo p99")
        check(g.lines[seen:] == [f"ok echo p{k}" for k in range(100)], "100 pipelined lines")
        g.send("echo sp")
        time.sleep(0.05)
        g.send("lit\n")
        check(g.expect(lambda l: l.startswith("ok echo sp")) == "ok echo split", "split line")
        g.send("echo " + "z" * 1019 + "\n")
        r = g.expect(lambda l: l.startswith("ok echo z"))
        check(r == "ok echo " + "z" * 1019, "1024-byte line")
        g.send("echo " + "z" * 3000 + "\nhealth\n")
        r = g.expect(lambda l: l.startswith("err line"))
        check(r == "err line too long (at most 1024 bytes)", r)
        check(g.expect(lambda l: l.startswith("ok health")) == "ok health", "served after it")
        g.send("stats\n")
        st = g.expect(lambda l: l.startswith("ok stats"))
        check(st.startswith("ok stats requests="), st)
        if args.console:
            check(g.com1.lines == [], f"COM1 silent with a virtio console: {g.com1.lines}")

        # The write reached the disk image.
        with microclient.connect(("127.0.0.1", port)) as c:
            r = microclient.request(c, "poweroff 9")
            check(r == "ok poweroff code=9", r)
        g.proc.wait(timeout=10)
        check(g.proc.returncode == (9 << 1) | 1, f"exit status {g.proc.returncode}")
        with open(disk, "rb") as f:
            f.seek(512 + 8 * 7)
            check(int.from_bytes(f.read(8), "little") == 42, "put 7 42 is on the disk image")
        print("all checks passed")
    finally:
        g.stop()
        err = g.proc.stderr.read().decode(errors="replace")
        # (QEMU's notice that it waits for the console socket's client is not a problem.)
        err = "\n".join(l for l in err.splitlines() if "QEMU waiting for connection" not in l)
        if err.strip():
            print("qemu stderr:", err, file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guest", default=os.path.join(ROOT, "target/guest/micro-guest"))
    p.add_argument("--tcg", action="store_true", help="no KVM (slow)")
    p.add_argument("--lines", choices=["pic", "ioapic"], default="pic")
    p.add_argument("--console", action="store_true", help="with a virtio console (see above)")
    p.add_argument("--port", type=int, default=0, help="host port (default: a free one)")
    try:
        run(p.parse_args())
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
