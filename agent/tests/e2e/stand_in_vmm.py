#!/usr/bin/python3
"""A stand-in for `vmm` that speaks the agent's side of the contract exactly (the
format::control frames on --api-sock and --report-fd, `synthesize` and `receive`), with a
toy guest instead of a VM: it serves the guest protocol (health, get, put, stats) from a
table in its memory, and a "handoff" moves that table to the receiving stand-in over TCP
(token line, then the table as JSON, then an "ok" back). It lets the agents' handoff be
tested end to end before the real vmm can hand off; handoff.rs has the test with the real
one. A Handoff with downtime_ms = 1 cuts the link in round 1 (a failure to test).

Frames: u32 LE length (of what follows), u16 LE version 1, postcard body.
"""
import json
import os
import socket
import struct
import sys
import threading
import time

VERSION = 1


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


def zigzag(n):
    return varint((n << 1) ^ (n >> 63))


def frame(body):
    return struct.pack("<IH", len(body) + 2, VERSION) + body


def sockaddr(host, port):
    # postcard SocketAddr::V4: variant 0, 4 octets, port as varint
    return b"\x00" + socket.inet_aton(host) + varint(port)


def read_varint(buf, i):
    n, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


class Stub:
    def __init__(self, argv):
        self.mode = argv[0]
        a = {}
        i = 1
        while i < len(argv):
            if argv[i] in ("--no-stdin", "-v"):
                i += 1
                continue
            a[argv[i]] = argv[i + 1]
            i += 2
        self.args = a
        self.report = os.fdopen(int(a["--report-fd"]), "wb", buffering=0)
        self.table = {}
        self.served = 0
        self.lock = threading.Lock()
        self.serving = threading.Event()
        self.guest = None
        self.fwd_host = a["--forward"].split("=")[0].rsplit(":", 1)[0]

    def send_report(self, body):
        self.report.write(frame(body))

    # The toy guest.
    def reply(self, req):
        w = req.split()
        with self.lock:
            self.served += 1
            if w == ["health"]:
                return "ok health"
            if len(w) == 2 and w[0] == "get":
                i = int(w[1])
                return "ok get i=%d value=%d" % (i, self.table.get(str(i), 0))
            if len(w) == 3 and w[0] == "put":
                self.table[w[1]] = int(w[2])
                return "ok put i=%s value=%s" % (w[1], w[2])
            if w == ["stats"]:
                return "ok stats requests=%d uptime_us=1 console=stand-in" % self.served
        return "err unknown request"

    def serve_conn(self, c):
        try:
            while True:
                head = c.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return
                (n,) = struct.unpack("<I", head)
                req = c.recv(n, socket.MSG_WAITALL).decode()
                if not self.serving.is_set():
                    return  # paused for the handoff: the client reconnects
                out = self.reply(req).encode()
                c.sendall(struct.pack("<I", len(out)) + out)
        except OSError:
            pass
        finally:
            c.close()

    def start_guest(self):
        self.guest = socket.socket()
        self.guest.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.guest.bind((self.fwd_host, 0))
        self.guest.listen(64)
        self.serving.set()
        g = self.guest

        def accept():
            while True:
                try:
                    c, _ = g.accept()
                except OSError:
                    return
                threading.Thread(target=self.serve_conn, args=(c,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return g.getsockname()[1]

    def ready(self, port):
        # Report::Ready { synthesis: None, forwards: [{host, guest_port: 80}] }
        self.send_report(b"\x00\x00\x01" + sockaddr(self.fwd_host, port) + varint(80))

    def progress(self, phase, rnd, nbytes):
        # Report::Handoff(HandoffProgress { phase, round, bytes, dirty_pages, bandwidth_bps })
        self.send_report(b"\x04" + varint(phase) + varint(rnd) + varint(nbytes) + varint(3) + varint(12_500_000))

    def handoff(self, body):
        # ApiRequest::Handoff { to: String, token: [u8; 32], downtime_ms: u32 }
        n, i = read_varint(body, 1)
        to = body[i:i + n].decode()
        token = body[i + n:i + n + 32].hex()
        downtime_ms, _ = read_varint(body, i + n + 32)
        t0 = time.monotonic()
        self.progress(0, 0, 0)
        host, port = to.rsplit(":", 1)
        try:
            s = socket.create_connection((host, int(port)), timeout=10)
            self.progress(1, 0, 100)
            s.sendall(token.encode() + b"\n")
            time.sleep(0.05)  # the "rounds", while the guest keeps serving
            self.progress(2, 1, 4096)
            if downtime_ms == 1:
                # The test's way to cut the link in the rounds.
                s.close()
                raise OSError("link cut in round 1 (the stand-in's downtime_ms=1 test mode)")
            # Pause: no more guest replies here; then the state goes.
            self.serving.clear()
            paused = time.monotonic()
            self.progress(3, 2, 8192)
            with self.lock:
                state = json.dumps({"table": self.table, "served": self.served}).encode()
            s.sendall(state + b"\n")
            ack = s.makefile("rb").readline()
            if ack.strip() != b"ok":
                raise OSError("the target did not acknowledge")
        except OSError as e:
            self.serving.set()
            msg = ("handoff failed: %s" % e).encode()
            return b"\x03" + varint(len(msg)) + msg  # ApiResponse::Error
        done = time.monotonic()
        self.guest.close()
        self.progress(4, 2, 8192 + len(state))
        stats = [2, 8192 + len(state) + 65, 3, 0, int((done - paused) * 1e6), int((done - t0) * 1e6), 100]
        self.exit_after = True
        return b"\x04" + b"".join(varint(x) for x in stats)  # ApiResponse::HandedOff

    def control(self):
        path = self.args["--api-sock"]
        try:
            os.unlink(path)
        except OSError:
            pass
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(8)
        self.exit_after = False
        while True:
            c, _ = srv.accept()
            head = c.recv(4, socket.MSG_WAITALL)
            if len(head) < 4:
                c.close()
                continue
            (n,) = struct.unpack("<I", head)
            body = c.recv(n, socket.MSG_WAITALL)[2:]
            stop = False
            if body[0] == 0:  # Status
                out = b"\x01\x00\x01" + varint(64)
            elif body[0] == 4:  # Stop
                out, stop = b"\x00", True
            elif body[0] == 5:  # Handoff
                out = self.handoff(body)
                stop = self.exit_after
            else:
                msg = b"not supported by the stand-in"
                out = b"\x03" + varint(len(msg)) + msg
            c.sendall(frame(out))
            c.close()
            if stop:
                self.send_report(b"\x02" + zigzag(0))  # Exited { code: 0 }
                os._exit(0)

    def synthesize(self):
        port = self.start_guest()
        threading.Thread(target=self.control, daemon=True).start()
        time.sleep(0.05)
        self.ready(port)
        threading.Event().wait()

    def receive(self):
        host, _ = self.args["--listen"].rsplit(":", 1)
        lst = socket.socket()
        lst.bind((host, 0))
        lst.listen(1)
        # Report::Listening { addr }
        self.send_report(b"\x03" + sockaddr(host, lst.getsockname()[1]))
        c, _ = lst.accept()
        f = c.makefile("rb")
        if f.readline().strip().decode() != os.environ.get("VMM_HANDOFF_TOKEN"):
            msg = b"bad token"
            # Report::Failed { kind: Other, chain: ["bad token"] }
            self.send_report(b"\x01\x04\x01" + varint(len(msg)) + msg)
            os._exit(1)
        line = f.readline()
        if not line:
            os._exit(1)
        st = json.loads(line)
        self.table, self.served = st["table"], st["served"]
        port = self.start_guest()
        threading.Thread(target=self.control, daemon=True).start()
        time.sleep(0.02)
        c.sendall(b"ok\n")
        self.ready(port)
        threading.Event().wait()


if __name__ == "__main__":
    s = Stub(sys.argv[1:])
    {"synthesize": s.synthesize, "receive": s.receive}[s.mode]()
