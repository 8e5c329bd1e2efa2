#!/usr/bin/env python3
"""One client flooding SENDs, and a well-behaved pair beside it.

What it shows: how much one logged-in client that SENDs as fast as it
can (to made-up user ids, pipelined) takes from everyone else, and what
the send budget (`limits.send_rate`, `limits.send_bytes_rate`,
docs/DEPLOY.md "Abuse: what one client can do") changes. The flooder
logs in again whenever the server closes it (4009, 4004), and with
--relogin-every N after every N SENDs, as a client trying to get a fresh
budget would. The pair is a sender that SENDs one message every 50 ms and
a device that acknowledges what it gets; its latency is from SEND to the
INBOX (or PUSH) arriving. With --same-worker the pair logs in until both
its connections are on the flooder's first server thread (the worst
case: the refusals cost that thread).

    python3 scripts/send-flood.py --addr 127.0.0.1:7700 --seconds 20 --payload 100 [--server-pid PID]

Needs only Python 3 (standard library). Tokens are minted with
--secret (default: $SWITCHBOARD_JWT_SECRET, else the development secret
of a server started without one). Prints one JSON object.
"""

import argparse
import base64
import collections
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import threading
import time

DEV_SECRET = "switchboard-dev-secret-do-not-use-in-production"
LOGIN_OK, LOGIN_ERROR, PUSH, SEND_ACK, CLOSE, ERROR, SYNC, INBOX = 0x02, 0x03, 0x06, 0x08, 0x0A, 0x0B, 0x16, 0x17


class LoginRefused(Exception):
    pass


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def token(secret, user):
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": user, "exp": int(time.time()) + 3600}).encode())
    signed = head + b"." + claims
    return signed + b"." + b64url(hmac.new(secret.encode(), signed, hashlib.sha256).digest())


def frame(kind, body):
    return struct.pack(">IBB", 2 + len(body), 1, kind) + body


def str8(text):
    raw = text.encode()
    return bytes([len(raw)]) + raw


def login_frame(secret, user, device=None):
    tok = token(secret, user)
    body = str8(user) + struct.pack(">H", len(tok)) + tok
    if device is not None:
        body += str8(device) + struct.pack(">Q", 0)
    return frame(0x01, body)


def send_frame(req_id, to, payload):
    return frame(0x07, struct.pack(">I", req_id) + str8(to) + payload)


class Conn:
    """A raw protocol v1 connection (docs/PROTOCOL.md 2): frames in, (type, body) out."""

    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def write(self, data):
        self.sock.sendall(data)

    def read(self, timeout):
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    kind, body = self.buf[5], self.buf[6 : 4 + n]
                    self.buf = self.buf[4 + n :]
                    return kind, body
            try:
                got = self.sock.recv(1 << 16)
            except socket.timeout:
                return None
            if not got:
                raise ConnectionError("the server closed the connection")
            self.buf += got

    def login(self, secret, user, device=None):
        """Logs in; returns the server thread the connection is on (the
        top byte of LOGIN_OK's conn_id)."""
        self.write(login_frame(secret, user, device))
        reply = self.read(10)
        if reply is not None and reply[0] == LOGIN_ERROR:
            code, n = struct.unpack(">HB", reply[1][:3])
            raise LoginRefused(f"login of {user} refused: {code} {reply[1][3:3 + n].decode(errors='replace')}")
        if reply is None or reply[0] != LOGIN_OK:
            raise LoginRefused(f"login of {user} failed: {reply}")
        return struct.unpack(">Q", reply[1][:8])[0] >> 56

    def close(self):
        self.sock.close()


def flooder(args, stop, out, on_worker):
    payload = b"x" * args.payload
    answers, closes = collections.Counter(), collections.Counter()
    sent = logins = 0
    while not stop.is_set():
        c = Conn(args.addr)
        worker = c.login(args.secret, "flooder")
        logins += 1
        if logins == 1:
            out["flooder_worker"] = worker
            on_worker.set()
        in_flight = this_login = 0
        try:
            while not stop.is_set() and not (args.relogin_every and this_login >= args.relogin_every):
                n = min(256, args.relogin_every - this_login) if args.relogin_every else 256
                c.write(b"".join(send_frame(sent + i + 1, f"flood-{sent + i}", payload) for i in range(n)))
                sent += n
                this_login += n
                in_flight += n
                while in_flight > args.depth or (args.relogin_every and this_login >= args.relogin_every and in_flight):
                    reply = c.read(10)
                    if reply is None:
                        break
                    kind, body = reply
                    if kind == CLOSE:
                        closes[struct.unpack(">H", body[:2])[0]] += 1
                        raise ConnectionError
                    if kind == SEND_ACK:
                        answers["SEND_ACK"] += 1
                    elif kind == ERROR:
                        answers[f"ERROR {struct.unpack('>H', body[:2])[0]}"] += 1
                    else:
                        continue
                    in_flight -= 1
        except (ConnectionError, OSError):
            pass
        c.close()
    out["flooder"] = {"sent": sent, "logins": logins, "answered": dict(answers), "closed": dict(closes)}


def on(args, user, device, worker):
    """A logged-in connection of `user`, on server thread `worker` if not None."""
    for _ in range(200):
        c = Conn(args.addr)
        got = c.login(args.secret, user, device)
        if worker is None or got == worker:
            return c, got
        c.close()
    raise LoginRefused(f"200 logins of {user} never landed on server thread {worker}")


def pair(args, stop, out, on_worker):
    on_worker.wait(10)
    worker = out.get("flooder_worker") if args.same_worker else None
    rx, rx_worker = on(args, "pair-rx", "pair-device", worker)
    tx, tx_worker = on(args, "pair-tx", None, worker)
    sent_at, latencies, errors = {}, [], collections.Counter()

    def receive():
        while not (stop.is_set() and len(latencies) >= len(sent_at)) and time.time() < deadline[0]:
            reply = rx.read(0.5)
            if reply is None:
                continue
            kind, body = reply
            if kind == INBOX:
                seq = struct.unpack(">Q", body[:8])[0]
                n = body[24]
                index = int(body[25 + n :])
                latencies.append(time.time() - sent_at[index])
                rx.write(frame(0x18, struct.pack(">Q", seq)))
            elif kind == PUSH:
                n = body[8]
                latencies.append(time.time() - sent_at[int(body[9 + n :])])

    def answers():
        while time.time() < deadline[0]:
            reply = tx.read(0.5)
            if reply is not None and reply[0] == ERROR:
                errors[struct.unpack(">H", reply[1][:2])[0]] += 1

    deadline = [float("inf")]
    threads = [threading.Thread(target=receive), threading.Thread(target=answers)]
    for t in threads:
        t.start()
    i = 0
    while not stop.is_set():
        sent_at[i] = time.time()
        tx.write(send_frame(i + 1, "pair-rx", str(i).encode()))
        i += 1
        time.sleep(0.05)
    deadline[0] = time.time() + 5
    for t in threads:
        t.join()
    lat = sorted(latencies)
    out["pair"] = {
        "workers": [tx_worker, rx_worker],
        "sent": len(sent_at),
        "received": len(lat),
        "errors": dict(errors),
        "p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
        "max_ms": round(lat[-1] * 1000, 1) if lat else None,
    }


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:7700", help="the server's raw TCP port")
    p.add_argument("--secret", default=os.environ.get("SWITCHBOARD_JWT_SECRET", DEV_SECRET))
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--payload", type=int, default=100, help="bytes per flooded SEND")
    p.add_argument("--depth", type=int, default=512, help="flooded SENDs unanswered at most")
    p.add_argument("--relogin-every", type=int, default=0, help="the flooder logs in anew after this many SENDs")
    p.add_argument("--same-worker", action="store_true", help="the pair on the flooder's first server thread")
    p.add_argument("--server-pid", type=int, help="report the server's RSS after the run")
    args = p.parse_args()
    # A server that is not there, or refuses the secret, is said here and
    # now (exit 1), not left to the threads, whose exceptions ended them
    # quietly and left `{}` printed with exit status 0.
    try:
        probe = Conn(args.addr)
        probe.login(args.secret, "flood-probe")
        probe.close()
    except (OSError, LoginRefused) as e:
        sys.exit(f"send-flood.py: {args.addr}: {e}")
    stop, out, on_worker = threading.Event(), {}, threading.Event()
    failures = []

    def run(f):
        try:
            f(args, stop, out, on_worker)
        except (OSError, LoginRefused) as e:
            failures.append(f"{f.__name__}: {e}")
            stop.set()
            on_worker.set()

    threads = [threading.Thread(target=run, args=(f,)) for f in (flooder, pair)]
    for t in threads:
        t.start()
    stop.wait(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    if args.server_pid:
        out["server_rss_mb"] = round(rss_kb(args.server_pid) / 1024)
    print(json.dumps(out))
    if failures:
        sys.exit("send-flood.py: " + "; ".join(failures))


if __name__ == "__main__":
    main()
