#!/usr/bin/env python3
"""Reliable delivery under randomized faults, checked from outside.

What it shows: whether the promise of docs/PROTOCOL.md section 15 holds
against the real `switchboard serve` while everything around it goes
wrong at once: every message a SEND_RESULT, SEND_ACK or admin API answer
called stored reaches every device of its user exactly once after dedup
by seq, in seq order (unless it had a `ttl_ms`, or the device was
forgotten, 15.2); nothing refused (ERROR 113/114, HTTP 507) ever
arrives; a seq never names two messages; a retry with a client id gets
the original seq and msg_id.

Each run (one seed) starts a server on a fresh data directory and runs,
for --seconds:
- users with 1 to 4 devices each, and one user with 34 to 37 device ids
  (past the 32-device cap, 15.2) whose devices come and go;
- devices that ACK at once, late, in batches or never (and are closed
  with 4007), stop reading for seconds, drop their connection with
  messages unacknowledged, go offline for up to 12 s (long enough for
  what they miss to leave the disk store's hot log), FETCH from
  arbitrary positions, log in with a
  stale or a future `last_seq`, log in again on a second connection
  while the first lingers (a network change: CLOSE 4008 on the old one),
  send SEND_EX with client ids of their own (to their own user or
  another, retried on the next connection), and now and then sign out
  (the API's forget_device, after their connection closed or while it
  goes on) and come back as a new device, at position 0;
- a quarter of the device connections over WebSocket with JSON
  messages (13.4), the rest raw TCP; a device changes transports
  between its connections;
- two connections without a device, whose PUSH frames must be stored
  messages with their msg_id, never refused ones;
- two senders: SEND_EX with client ids (retried after every dropped
  connection with the same id, and replayed long after the answer, now
  and then with another payload: the original seq and msg_id must come
  back, and that payload never arrive), SEND_EX with an expiry,
  plain SENDs and SEND_EX without a client id (never retried: "may be
  stored" when the answer is lost); they drop their own connections;
- the application pushing through the admin API, with client ids
  (retried until answered, and replayed), to several users at once
  with one client id, with `ttl_ms`, without a client id, and at most
  once;
- the server killed with SIGKILL at random moments (one time in five
  within 0.3 s of its start, while it recovers and everyone logs in
  again), or sent SIGTERM (a drain; half of those cut short by SIGKILL),
  and started again on the same directory (one start in seven killed
  again within 0.25 s, while it opens the store, before it listens), its durability switched now
  and then (disk store; never with the memory store, which loses
  everything at a restart by design).
Store settings come from the seed: disk `fsync` or `os`, 1 to 3 shards,
or the memory store; small inbox and byte limits in some runs so that
refusals happen. Then sending stops, every device catches up, and the
checks above run on what each device stored; the store's own account
of each inbox (/api/v1/inbox: the head, each device's position, at
most 32 devices) must match what the devices hold; and the server's log
must have no ERROR line or panic.

    python3 scripts/chaos.py [--runs 20] [--seed 1] [--seconds 30] [--out DIR]

A run is repeated by its seed (--seed S --runs 1); the kill times and
the interleavings are the host's, so a failure found once may need a few
runs of its seed to show again. --drop-one-in N makes the devices lose
one INBOX in N and ACK past it: such a run must fail (the checks' own
test). Prints one line per run (JSON: the store, the counts of kills,
messages, refusals, devices, frames) and a summary; keeps the server
logs and the failures of runs that failed under --out. Exit status: 0 every
run held; 1 a run found a violation (it is printed, and the run's
server logs kept); 2 bad usage; 3 the server could not be built or
started. Long by design: not part of the test suite or CI. Needs Python
3 (standard library) and a Rust toolchain (it builds the release binary
when --bin is not given); it takes the loopback ports --port, --port + 1
(the admin API) and --port + 2 (WebSocket; default: --port at random
from 10000 up to the ephemeral port range, where no outgoing connection
takes it between two starts).
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_SECRET = b"switchboard-dev-secret-do-not-use-in-production"

LOGIN, LOGIN_OK, LOGIN_ERROR, PING, PONG, PUSH = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
SEND, SEND_ACK, CLOSE, ERROR = 0x07, 0x08, 0x0A, 0x0B
SYNC, INBOX, ACK, FETCH, SEND_EX, SEND_RESULT = 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1B

NORMAL_USERS = ["u0", "u1", "u2", "u3", "u4"]
CAP_USER = "ucap"
SENDERS = ["s0", "s1"]
# The most connections of the cap user this script holds at once: below
# limits.max_conns_per_user (16), so that its logins are not refused.
CAP_CONCURRENT = 12
CATCH_UP_S = 90


class Closed(Exception):
    pass


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def token(user):
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": user, "exp": int(time.time()) + 86400}).encode())
    signed = head + b"." + claims
    return signed + b"." + b64url(hmac.new(DEV_SECRET, signed, hashlib.sha256).digest())


def str8(text):
    raw = text.encode()
    return bytes([len(raw)]) + raw


def read_str8(body, at):
    n = body[at]
    return body[at + 1 : at + 1 + n].decode(), at + 1 + n


class Conn:
    """One protocol connection: frames out, frames in (with a timeout)."""

    def __init__(self, port, timeout=2.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, kind, body):
        try:
            self.sock.sendall(struct.pack(">IBB", 2 + len(body), 1, kind) + body)
        except OSError as e:
            raise Closed(str(e))

    def _read_more(self, deadline):
        """Reads what has come into the buffer; False once `deadline` has
        passed with nothing."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError as e:
            raise Closed(str(e))
        if not data:
            raise Closed("eof")
        self.buf += data
        return True

    def recv(self, timeout):
        """One frame (kind, body), or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    kind, body = self.buf[5], self.buf[6 : 4 + n]
                    self.buf = self.buf[4 + n :]
                    if kind == PING:
                        self.send(PONG, body)
                        continue
                    return kind, body
            if not self._read_more(deadline):
                return None

    def close(self, reset=False):
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass

    def login(self, user, device=None, last_seq=0):
        body = str8(user) + struct.pack(">H", len(token(user))) + token(user)
        if device is not None:
            body += str8(device) + struct.pack(">Q", last_seq)
        self.send(LOGIN, body)
        while True:
            f = self.recv(5.0)
            if f is None:
                raise Closed("no LOGIN_OK")
            if f[0] == LOGIN_OK:
                return
            if f[0] == LOGIN_ERROR:
                raise Closed("LOGIN_ERROR %d" % struct.unpack(">H", f[1][:2])[0])
            if f[0] == CLOSE:
                raise Closed("CLOSE %d before LOGIN_OK" % struct.unpack(">H", f[1][:2])[0])


class WsConn(Conn):
    """The same connection over WebSocket with JSON messages (PROTOCOL.md
    13): frames in and out are translated, so the callers see frames."""

    def __init__(self, port, timeout=2.0):
        super().__init__(port, timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: switchboard.v1.json\r\n\r\n" % key
            ).encode()
        )
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise Closed("eof in the handshake")
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise Closed("upgrade refused: %r" % head[:60])

    def ws_send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        try:
            self.sock.sendall(head + mask + masked)
        except OSError as e:
            raise Closed(str(e))

    def json(self, doc):
        self.ws_send(1, json.dumps(doc).encode())

    def send(self, kind, body):
        # The 64-bit fields as strings or integers, both allowed (13.4).
        big = (lambda v: str(v)) if random.random() < 0.5 else (lambda v: v)
        if kind == ACK:
            self.json({"type": "ack", "seq": big(struct.unpack(">Q", body)[0])})
        elif kind == FETCH:
            req, after, limit = struct.unpack(">IQH", body)
            self.json({"type": "fetch", "req_id": req, "after_seq": big(after), "limit": limit})
        elif kind == SEND:
            req = struct.unpack(">I", body[:4])[0]
            to, at = read_str8(body, 4)
            self.json({"type": "send", "req_id": req, "to": to, "payload": body[at:].decode()})
        elif kind == SEND_EX:
            req, flags, cid = struct.unpack(">IBQ", body[:13])
            at = 13
            doc = {"type": "send", "req_id": req, "client_id": big(cid)}
            if flags & 2:
                doc["ttl_ms"] = struct.unpack(">I", body[13:17])[0]
                at = 17
            doc["to"], at = read_str8(body, at)
            doc["payload"] = body[at:].decode()
            self.json(doc)
        elif kind == PONG:
            pass
        else:
            raise ValueError("no JSON form here for frame 0x%02x" % kind)

    def login(self, user, device=None, last_seq=0):
        doc = {"type": "login", "user": user, "token": token(user).decode()}
        if device is not None:
            doc["device"], doc["last_seq"] = device, str(last_seq)
        self.json(doc)
        f = self.recv(5.0)
        if f is None:
            raise Closed("no login_ok")
        if f[0] != LOGIN_OK:
            raise Closed("login answered 0x%02x" % f[0])

    def recv(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            m = self.ws_message()
            if m is not None:
                opcode, payload = m
                if opcode == 9:
                    self.ws_send(10, payload)
                    continue
                if opcode == 8:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                    return CLOSE, struct.pack(">H", code) + str8(payload[2:].decode(errors="replace")[:80])
                if opcode == 1:
                    f = self.frame_of(json.loads(payload))
                    if f is not None:
                        return f
                    continue
                raise Closed("unexpected WebSocket opcode %d" % opcode)
            if not self._read_more(deadline):
                return None

    def ws_message(self):
        """One whole server message (opcode, payload) from the buffer, if in."""
        b = self.buf
        if len(b) < 2:
            return None
        n, at = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, at = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, at = struct.unpack(">Q", b[2:10])[0], 10
        if len(b) < at + n:
            return None
        self.buf = b[at + n :]
        return b[0] & 0x0F, b[at : at + n]

    @staticmethod
    def frame_of(m):
        """A JSON message as the binary frame it stands for."""
        t = m["type"]

        def payload():
            if "payload_b64" in m:
                return base64.b64decode(m["payload_b64"])
            return m["payload"].encode()

        if t == "login_ok":
            return LOGIN_OK, b""
        if t == "login_error":
            return LOGIN_ERROR, struct.pack(">H", m["code"]) + str8(m["reason"][:80])
        if t == "sync":
            return SYNC, struct.pack(
                ">IQQQ", m["req_id"], int(m["position"]), int(m["head_seq"]), int(m["page_end"])
            )
        if t == "inbox":
            head = struct.pack(">QQQ", int(m["seq"]), int(m["msg_id"]), int(m["ts_ms"]))
            return INBOX, head + str8(m["from"]) + payload()
        if t == "send_result":
            outcome = {"stored": 0, "duplicate": 1, "relayed": 2}[m["outcome"]]
            body = struct.pack(">IBQQI", m["req_id"], outcome, int(m["seq"]), int(m["msg_id"]), m["delivered"])
            return SEND_RESULT, body
        if t == "send_ack":
            return SEND_ACK, struct.pack(">II", m["req_id"], m["delivered"])
        if t == "error":
            return ERROR, struct.pack(">HI", m["code"], m["req_id"]) + str8(m["reason"][:80])
        if t == "push":
            return PUSH, struct.pack(">Q", int(m["msg_id"])) + str8(m["from"]) + payload()
        if t == "pong":
            return None
        raise Closed("unexpected JSON message %r" % t)

    def close(self, reset=False):
        if not reset:
            try:
                self.ws_send(8, struct.pack(">H", 1000))
            except Closed:
                pass
        super().close(reset)


class Msg:
    """A message one of the script's senders made."""

    def __init__(self, to, payload, kind, client_id=0, ttl_ms=0, sender=""):
        self.to, self.payload, self.kind = to, payload, kind
        self.client_id, self.ttl_ms, self.sender = client_id, ttl_ms, sender
        # pending (no final answer yet), stored, refused, maybe (may be stored)
        self.status = "pending"
        self.seq = None
        self.msg_id = None
        self.answers = []  # (seq, msg_id, duplicate) of each stored/duplicate answer
        self.sent_t = time.time()
        self.decoy_of = None  # a stored message whose client id this one reuses
        self.attempt = None  # ((sender, connection number), index on it) of the last send
        self.stored_at = None  # the attempt answered stored (not duplicate)


class Device:
    """One device (user, device id) as its app would keep it: every INBOX
    it stored, by seq, across all its connections and restarts; a life
    starts at its first login and again at each login after a forget."""

    def __init__(self, user, name, cap):
        self.user, self.name, self.cap = user, name, cap
        self.held = {}  # seq -> (msg_id, from, payload)
        self.life = 0
        self.first_head = None  # the first SYNC head of the current life
        self.life_start = None  # the time of that SYNC
        self.max_req = 0  # the highest seq held above first_head
        # After a forget: the count of LOGINs sent then. Only the first
        # LOGIN after a forget must be a new device's: one whose SYNC never
        # came (the connection or the server died first) may have made
        # the device known again, and the next login's last_seq then counts.
        self.expect_new = None
        self.logins = 0
        self.outbox = []  # messages this device sent (SEND_EX with a client id) not yet answered
        self.conns = 0


class Run:
    """One seed: a server on a fresh directory, the chaos, the checks."""

    def __init__(self, seed, seconds, port, admin, bin_path, drop_one_in=0):
        self.drop_one_in = drop_one_in
        self.seed, self.seconds = seed, seconds
        self.port, self.admin = port, admin
        self.bin = bin_path
        self.rng = random.Random(seed)
        r = self.rng
        kinds = [("disk", "fsync", 1), ("disk", "os", 1), ("disk", "fsync", 2), ("disk", "os", 3), ("memory", "-", 1)]
        self.kind, self.durability, self.shards = kinds[seed % len(kinds)]
        self.inbox_limit = r.choice([100000, 100000, r.randint(60, 400)])
        # The least store.max_bytes the server takes is 1 MiB: runs with
        # it send larger payloads, so that it fills within the run.
        self.max_bytes = r.choice([1 << 30, 1 << 30, 1 << 30, 1 << 20])
        self.pad_max = 3000 if self.max_bytes < (1 << 30) else 300
        self.window = r.choice([4, 8, 16, 64])
        self.first_page = r.choice([2, 5, 20])
        self.max_fetch = r.choice([3, 10, 50, 1000])
        self.ack_timeout_ms = r.choice([300, 600, 1500])
        self.retention_ms = r.choice([100, 300, 1000])
        self.lock = threading.Lock()
        self.msgs = {}  # (recipient, payload) -> Msg
        self.failures = []
        self.notes = []
        self.devices = []
        self.stop_sending = threading.Event()
        self.calm = threading.Event()
        self.server = None
        self.starts = 0
        self.kills = 0
        self.terms = 0
        self.frames_in = 0
        self.dup_inbox = 0
        self.replays = 0
        self.replaced = 0
        self.made = 0
        self.early_kills = 0
        self.forgets_connected = 0
        self.inbox_checks = 0
        self.logins = [0, 0]  # over raw TCP, over WebSocket
        self.pushes = []  # (user, msg_id, from, payload) on connections without a device
        self.cap_slots = threading.BoundedSemaphore(CAP_CONCURRENT)
        self.dir = tempfile.mkdtemp(prefix="sb-chaos-%d-" % seed)
        self.final_head = {}

    # ---- bookkeeping -------------------------------------------------

    def fail(self, text):
        with self.lock:
            if len(self.failures) < 200:
                self.failures.append(text)

    def note(self, text):
        with self.lock:
            if len(self.notes) < 200:
                self.notes.append(text)

    def new_msg(self, to, kind, sender, client_id=0, ttl_ms=0, payload=None):
        with self.lock:
            self.made += 1
            n = self.made
        if payload is None:
            payload = "%s|%s|%d|%s" % (sender, kind, n, "x" * random.randint(0, self.pad_max))
        m = Msg(to, payload, kind, client_id, ttl_ms, sender)
        with self.lock:
            self.msgs[(to, payload)] = m
        return m

    def answered(self, m, seq, msg_id, duplicate):
        if m.decoy_of is not None:
            o = m.decoy_of
            if not duplicate or (seq, msg_id) != (o.seq, o.msg_id):
                self.fail(
                    "%s: its client id again with another payload answered duplicate=%s seq %d msg_id %d, "
                    "the original seq %s msg_id %s" % (m.to, duplicate, seq, msg_id, o.seq, o.msg_id)
                )
            m.answers.append((seq, msg_id, duplicate))
            return
        with self.lock:
            m.answers.append((seq, msg_id, duplicate))
            if m.status == "stored" and (m.seq, m.msg_id) != (seq, msg_id):
                self.failures.append(
                    "%s: answered seq %d msg_id %d, before seq %s msg_id %s (client_id %d)"
                    % (m.payload[:24], seq, msg_id, m.seq, m.msg_id, m.client_id)
                )
            if m.status == "refused":
                self.failures.append("%s: stored after a refusal" % m.payload[:24])
            if m.status != "stored":
                m.status, m.seq, m.msg_id = "stored", seq, msg_id
            if not duplicate:
                m.stored_at = m.attempt

    # ---- the server --------------------------------------------------

    def config(self, durability):
        return (
            "[server]\nworkers = 2\n[websocket]\nlisten = \"127.0.0.1:%d\"\n"
            "[timeouts]\ntick_ms = 100\n"
            "[drain]\nwindow_ms = 300\nreconnect_jitter_ms = 200\n"
            "[store]\nkind = %s\ndurability = %s\nshards = %d\nmax_messages_per_inbox = %d\n"
            "max_bytes = %d\nretention_interval_ms = %d\nwrite_buffer_mib = 4\n"
            "[delivery]\nwindow = %d\nfirst_page = %d\nmax_fetch = %d\nack_timeout_ms = %d\n"
            % (
                self.port + 2,
                json.dumps(self.kind),
                json.dumps(durability if self.kind == "disk" else "os"),
                self.shards,
                self.inbox_limit,
                self.max_bytes,
                self.retention_ms,
                self.window,
                self.first_page,
                self.max_fetch,
                self.ack_timeout_ms,
            )
        )

    def start(self, durability, kill_after=None):
        """Starts the server and waits until it listens; with kill_after,
        SIGKILLs it that many seconds after it was spawned instead. A port
        another process holds for a moment (the local end of someone's
        connection, on a shared host) is waited out, for up to 30 s."""
        for _ in range(30):
            if self.start_once(durability, kill_after):
                return
            time.sleep(1)
        raise SetupError("the server found its ports in use for 30 s (start %d)" % self.starts)

    def start_once(self, durability, kill_after):
        """One try of `start`: False if a port was in use."""
        self.starts += 1
        cfg = os.path.join(self.dir, "switchboard.toml")
        with open(cfg, "w") as f:
            f.write(self.config(durability))
        log = open(os.path.join(self.dir, "server-%03d.log" % self.starts), "w")
        log.write("# start %d, durability %s\n" % (self.starts, durability))
        log.flush()
        env = dict(os.environ)
        env.pop("SWITCHBOARD_JWT_SECRET", None)
        env["NO_COLOR"] = "1"
        self.server = subprocess.Popen(
            [
                self.bin, "serve", "--config", cfg, "--data-dir", os.path.join(self.dir, "data"),
                "--listen", "127.0.0.1:%d" % self.port, "--admin", "127.0.0.1:%d" % self.admin,
                "--log", "warn",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env,
        )
        log.close()
        if kill_after is not None:
            time.sleep(kill_after)
            self.stop("kill")
            return True
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.server.poll() is not None:
                with open(os.path.join(self.dir, "server-%03d.log" % self.starts)) as f:
                    if "address in use" in f.read():
                        return False
                raise SetupError("the server exited at start %d (%s)" % (self.starts, self.dir))
            if listening(self.port) and listening(self.admin) and listening(self.port + 2):
                return True
            time.sleep(0.02)
        raise SetupError("the server did not listen within 60 s of start %d" % self.starts)

    def stop(self, how):
        p = self.server
        if how == "term":
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                self.fail("the server did not exit within 30 s of SIGTERM (start %d)" % self.starts)
                p.kill()
                p.wait()
            if p.returncode not in (0,):
                self.fail("the server exited with %s after SIGTERM (start %d)" % (p.returncode, self.starts))
        else:
            p.kill()
            p.wait()
        deadline = time.time() + 20
        while (listening(self.port) or listening(self.admin) or listening(self.port + 2)) and time.time() < deadline:
            time.sleep(0.01)

    # ---- clients -----------------------------------------------------

    def connect(self, user, device=None, last_seq=0, give_up=None, ws=False, dev=None):
        """Logs in (over WebSocket with JSON if `ws`), retrying while the
        server is away. Counts the device `dev`'s LOGINs sent."""
        deadline = time.time() + 120
        while True:
            if give_up is not None and give_up():
                return None
            try:
                c = WsConn(self.port + 2) if ws else Conn(self.port)
                try:
                    if dev is not None:
                        dev.logins += 1
                    c.login(user, device, last_seq)
                    with self.lock:
                        self.logins[ws] += 1
                    return c
                except Closed:
                    c.close()
                    raise
            except (OSError, Closed) as e:
                if time.time() > deadline:
                    self.fail("%s/%s could not log in for 120 s: %s" % (user, device, e))
                    return None
                time.sleep(random.uniform(0.02, 0.15))

    def sender(self, user, rng):
        outstanding = {}  # req_id -> Msg
        resend = []  # client-id messages to send again, in order
        conn_no = 0
        next_req = 1
        while True:
            if self.stop_sending.is_set() and not resend and not outstanding:
                return
            c = self.connect(user)
            if c is None:
                return
            conn_no += 1
            this_conn = [(user, conn_no), 0]  # the connection, and how many were sent on it
            try:
                todo, resend = resend, []
                for m in todo:
                    self.send_msg(c, m, next_req, outstanding, this_conn)
                    next_req += 1
                drop_at = time.time() + rng.uniform(0.5, 8)
                while True:
                    if not self.stop_sending.is_set() and len(outstanding) < 12 and rng.random() < 0.6:
                        m = self.make(user, rng)
                        self.send_msg(c, m, next_req, outstanding, this_conn)
                        next_req += 1
                        time.sleep(rng.uniform(0, 0.004))
                    if self.stop_sending.is_set() and not outstanding:
                        if not resend:
                            c.close()
                            return
                        break
                    f = c.recv(0.02)
                    if f is not None:
                        self.sender_frame(user, f, outstanding, resend)
                    if not self.stop_sending.is_set() and time.time() > drop_at:
                        raise Closed("dropped by the sender")
            except Closed:
                pass
            c.close(reset=rng.random() < 0.5)
            for _, m in sorted(outstanding.items()):
                if m.client_id:
                    resend.append(m)
                elif m.status == "pending":
                    m.status = "maybe"
            outstanding.clear()
            resend.sort(key=lambda m: m.client_id)
            time.sleep(rng.uniform(0, 0.05))

    def replay(self, sender, rng):
        """A client-id message of `sender` answered stored at least 3 s ago,
        to send again: its answer must be `duplicate` with the original seq
        and msg_id, however many restarts ago it was stored."""
        with self.lock:
            old = [
                m for m in self.msgs.values()
                if m.sender == sender and m.client_id and m.status == "stored" and m.answers
                and time.time() - m.sent_t > 3
            ]
        if not old:
            return None
        self.replays += 1
        m = rng.choice(old)
        if rng.random() < 0.3:
            # The client id again with another payload: answered
            # `duplicate` with the original's seq and msg_id, and this
            # payload dropped (15.9): it must never arrive.
            decoy = self.new_msg(m.to, "r", sender, client_id=m.client_id)
            decoy.status, decoy.decoy_of = "decoy", m
            return decoy
        return m

    def make(self, user, rng):
        if rng.random() < 0.04:
            m = self.replay(user, rng)
            if m is not None:
                return m
        to = rng.choice(NORMAL_USERS + NORMAL_USERS + [CAP_USER])
        x = rng.random()
        if x < 0.5:
            m = self.new_msg(to, "x", user, client_id=rng.getrandbits(63) | 1)
        elif x < 0.65:
            m = self.new_msg(to, "t", user, client_id=rng.getrandbits(63) | 1, ttl_ms=rng.choice([50, 500, 3000]))
        elif x < 0.85:
            m = self.new_msg(to, "p", user)
        else:
            m = self.new_msg(to, "z", user)
        return m

    def send_msg(self, c, m, req, outstanding, this_conn):
        outstanding[req] = m
        this_conn[1] += 1
        m.attempt = (this_conn[0], this_conn[1])
        if m.kind == "p":
            c.send(SEND, struct.pack(">I", req) + str8(m.to) + m.payload.encode())
            return
        flags = 2 if m.ttl_ms else 0
        body = struct.pack(">IBQ", req, flags, m.client_id)
        if m.ttl_ms:
            body += struct.pack(">I", m.ttl_ms)
        c.send(SEND_EX, body + str8(m.to) + m.payload.encode())

    def sender_frame(self, user, f, outstanding, resend):
        kind, body = f
        if kind == SEND_RESULT:
            req, outcome, seq, msg_id, _ = struct.unpack(">IBQQI", body)
            m = outstanding.pop(req, None)
            if m is None:
                self.fail("%s: SEND_RESULT for req_id %d not out" % (user, req))
                return
            if outcome == 2:
                self.fail("%s: %s relayed, not stored" % (user, m.payload[:24]))
            elif outcome == 1 and not m.client_id:
                self.fail("%s: %s without a client id answered duplicate" % (user, m.payload[:24]))
            else:
                self.answered(m, seq, msg_id, outcome == 1)
        elif kind == SEND_ACK:
            req, _ = struct.unpack(">II", body)
            m = outstanding.pop(req, None)
            if m is None:
                self.fail("%s: SEND_ACK for req_id %d not out" % (user, req))
                return
            with self.lock:
                m.status, m.stored_at = "stored", m.attempt
        elif kind == ERROR:
            code, req = struct.unpack(">HI", body[:6])
            reason = read_str8(body, 6)[0]
            m = outstanding.pop(req, None)
            if m is None:
                self.fail("%s: ERROR %d for req_id %d not out: %s" % (user, code, req, reason))
                return
            if code in (113, 114):
                with self.lock:
                    if m.status in ("stored", "decoy"):
                        self.failures.append("%s: refused (%d) after it was stored" % (m.payload[:24], code))
                    else:
                        m.status = "refused"
            elif code == 115 and m.client_id:
                resend.append(m)
            elif code == 115:
                m.status = "maybe"
            else:
                self.fail("%s: ERROR %d to %s: %s" % (user, code, m.payload[:24], reason))
        elif kind == CLOSE:
            code = struct.unpack(">H", body[:2])[0]
            if code != 1001:
                self.note("%s: CLOSE %d %s" % (user, code, read_str8(body, 2)[0]))
            raise Closed("CLOSE")
        elif kind == PUSH:
            pass
        else:
            self.fail("%s: unexpected frame 0x%02x" % (user, kind))

    def api(self, path, doc, timeout=5.0):
        req = urllib.request.Request(
            "http://127.0.0.1:%d%s" % (self.admin, path),
            data=json.dumps(doc).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (OSError, urllib.error.URLError) as e:
            return None, str(e)

    def application(self, rng):
        while not self.stop_sending.is_set():
            to = rng.choice(NORMAL_USERS + NORMAL_USERS + [CAP_USER])
            x = rng.random()
            if x < 0.15:
                self.api("/api/v1/push", {"user": to, "text": "live only", "mode": "at_most_once"})
                continue
            if x < 0.23:
                self.push_many(rng)
                continue
            m = self.replay("app", rng) if x < 0.27 else None
            if m is not None:
                to = m.to
            elif x < 0.55:
                m = self.new_msg(to, "a", "app", client_id=rng.getrandbits(53) | 1)
            elif x < 0.75:
                m = self.new_msg(to, "b", "app", client_id=rng.getrandbits(53) | 1, ttl_ms=rng.choice([50, 500, 3000]))
            else:
                m = self.new_msg(to, "n", "app")
            doc = {"user": to, "text": m.payload}
            if m.client_id:
                doc["client_id"] = m.client_id
            if m.ttl_ms:
                doc["ttl_ms"] = m.ttl_ms
            deadline = time.time() + 120
            while True:
                status, body = self.api("/api/v1/push", doc)
                if status == 200:
                    a = json.loads(body)
                    if not a.get("stored"):
                        self.fail("app: %s answered 200 but not stored: %s" % (m.payload[:24], body))
                    elif a.get("duplicate") and not m.client_id:
                        self.fail("app: %s without a client id answered duplicate" % m.payload[:24])
                    else:
                        self.answered(m, a["seq"], a["msg_id"], a.get("duplicate", False))
                    break
                if status == 507:
                    with self.lock:
                        if m.status in ("stored", "decoy"):
                            self.failures.append("app: %s refused (507) after it was stored" % m.payload[:24])
                        else:
                            m.status = "refused"
                    break
                if status is not None and status not in (503, 504):
                    self.fail("app: push answered %s: %s" % (status, body[:200]))
                    m.status = "maybe"
                    break
                if not m.client_id:
                    m.status = "maybe"
                    break
                if time.time() > deadline:
                    self.fail("app: %s not answered for 120 s (%s)" % (m.payload[:24], body[:100]))
                    m.status = "maybe"
                    break
                time.sleep(rng.uniform(0.02, 0.1))
            time.sleep(rng.uniform(0, 0.01))

    def push_many(self, rng):
        """One push to several users with one client id (each user's key),
        retried until every user's outcome is final."""
        users = rng.sample(NORMAL_USERS + [CAP_USER], rng.randint(2, 3))
        cid = rng.getrandbits(53) | 1
        first = self.new_msg(users[0], "m", "app", client_id=cid)
        msgs = {first.to: first}
        for u in users[1:]:
            msgs[u] = self.new_msg(u, "m", "app", client_id=cid, payload=first.payload)
        deadline = time.time() + 120
        while True:
            # Again only to the users without an outcome: a refused one
            # may be stored by a retry once its inbox has room.
            todo = [u for u in users if msgs[u].status == "pending"]
            status, body = self.api("/api/v1/push", {"users": todo, "text": first.payload, "client_id": cid})
            if status == 200:
                for r in json.loads(body)["results"]:
                    m = msgs[r["user"]]
                    if r["status"] == 200:
                        if not r.get("stored"):
                            self.fail("app: %s to %s answered 200 but not stored" % (m.payload[:24], m.to))
                        self.answered(m, r["seq"], r["msg_id"], r.get("duplicate", False))
                    elif r["status"] == 507:
                        with self.lock:
                            if m.status == "stored":
                                self.failures.append("app: %s to %s refused after it was stored" % (m.payload[:24], m.to))
                            elif m.status == "pending":
                                m.status = "refused"
                    elif r["status"] not in (503, 504):
                        self.fail("app: %s to %s answered %s: %s" % (m.payload[:24], m.to, r["status"], r))
                        m.status = "maybe"
            elif status is not None and status not in (503, 504):
                self.fail("app: a push to %s answered %s: %s" % (users, status, body[:200]))
                for m in msgs.values():
                    if m.status == "pending":
                        m.status = "maybe"
            if all(m.status != "pending" for m in msgs.values()):
                return
            if time.time() > deadline:
                self.fail("app: the push of %s to %s not answered for 120 s" % (first.payload[:24], users))
                for m in msgs.values():
                    if m.status == "pending":
                        m.status = "maybe"
                return
            time.sleep(rng.uniform(0.02, 0.1))

    # ---- devices -----------------------------------------------------

    def plain_receiver(self, user, rng):
        """A connection of `user` without a device: stored messages come as
        PUSH, at most once (15.11); what comes must be a stored message's,
        with its msg_id, never a refused one's."""
        while not self.calm.is_set():
            c = self.connect(user, give_up=self.calm.is_set, ws=rng.random() < 0.5)
            if c is None:
                return
            try:
                end = time.time() + rng.uniform(1, 8)
                while time.time() < end and not self.calm.is_set():
                    f = c.recv(0.1)
                    if f is None:
                        continue
                    kind, body = f
                    if kind == PUSH:
                        msg_id = struct.unpack(">Q", body[:8])[0]
                        frm, at = read_str8(body, 8)
                        with self.lock:
                            self.pushes.append((user, msg_id, frm, body[at:].decode()))
                    elif kind == CLOSE:
                        raise Closed("CLOSE")
                    elif kind != ERROR:
                        self.fail("%s (no device): unexpected frame 0x%02x" % (user, kind))
            except Closed:
                pass
            c.close()

    def device_loop(self, d, rng):
        while True:
            if self.calm.is_set():
                self.catch_up(d, rng)
                return
            if d.cap:
                time.sleep(rng.uniform(0.2, 4))
                with self.cap_slots:
                    self.device_session(d, rng, rng.uniform(0.3, 3))
            else:
                self.device_session(d, rng, rng.uniform(1, 10))
                # Offline a moment, or long enough that what it misses
                # leaves the disk store's hot log for its database.
                time.sleep(rng.uniform(0, 1.5) if rng.random() < 0.85 else rng.uniform(4, 12))
            if not d.cap and not self.calm.is_set() and rng.random() < 0.03:
                self.sign_out(d)

    def sign_out(self, d):
        """The app signed out: the backend forgets the device, which comes
        back later as a new device (15.2): a new life."""
        deadline = time.time() + 60
        while time.time() < deadline:
            status, _ = self.api("/api/v1/forget_device", {"user": d.user, "device": d.name})
            if status == 200:
                with self.lock:
                    d.life += 1
                    d.first_head = None
                    # Its next login is a new device's, at position 0.
                    d.expect_new = d.logins
                return
            time.sleep(0.05)
        self.fail("%s/%s: forget_device not answered for 60 s" % (d.user, d.name))

    def have(self, d):
        return max(d.held) if d.held else 0

    def inbox(self, d, body, conn_head):
        seq, msg_id, _ts_ms = struct.unpack(">QQQ", body[:24])
        frm, at = read_str8(body, 24)
        payload = body[at:].decode()
        if self.drop_one_in and random.randrange(self.drop_one_in) == 0:
            return  # --drop-one-in: this client loses it (the checks must see that)
        with self.lock:
            self.frames_in += 1
            if seq in d.held:
                self.dup_inbox += 1
                if d.held[seq] != (msg_id, frm, payload):
                    self.failures.append(
                        "%s/%s: seq %d again as %s, held %s" % (d.user, d.name, seq, payload[:24], d.held[seq][2][:24])
                    )
                return
            if d.first_head is not None and seq > d.first_head and seq < d.max_req:
                self.failures.append(
                    "%s/%s: seq %d arrived after seq %d (life %d, first head %d)"
                    % (d.user, d.name, seq, d.max_req, d.life, d.first_head)
                )
            d.held[seq] = (msg_id, frm, payload)
            if d.first_head is not None and seq > d.first_head:
                d.max_req = max(d.max_req, seq)

    def session_frames(self, d, c, f, st):
        """One frame on a device connection; st is the connection's state."""
        kind, body = f
        if kind == SYNC:
            req, position, head, page_end = struct.unpack(">IQQQ", body)
            with self.lock:
                if req == 0 and not st["synced"]:
                    st["synced"] = True
                    if d.expect_new is not None and d.logins == d.expect_new + 1 and position != 0:
                        self.failures.append(
                            "%s/%s: the first login after forget_device at position %d, not 0 (last_seq %d)"
                            % (d.user, d.name, position, st["last_seq"])
                        )
                    d.expect_new = None
                    if d.first_head is None:
                        d.first_head = head
                        d.life_start = time.time()
                        d.max_req = max([s for s in d.held if s > head], default=0)
                    if position < st["last_seq"] and st["last_seq"] <= head and not d.cap and d.life == 0:
                        self.failures.append(
                            "%s/%s: login SYNC position %d below last_seq %d (head %d)"
                            % (d.user, d.name, position, st["last_seq"], head)
                        )
                    if position > self.have(d):
                        self.failures.append(
                            "%s/%s: login SYNC position %d past what it holds (%d)"
                            % (d.user, d.name, position, self.have(d))
                        )
            st["head"] = max(st["head"], head)
            st["page_end"] = page_end
            st["fetching"] = False
        elif kind == INBOX:
            self.inbox(d, body, st["head"])
            seq = struct.unpack(">Q", body[:8])[0]
            st["head"] = max(st["head"], seq)
            st["unacked"] += 1
        elif kind == PUSH:
            _, at = read_str8(body, 8)
            if body[at:] != b"live only":
                self.fail("%s/%s: a PUSH on a device connection: %r" % (d.user, d.name, body[at:][:40]))
        elif kind == SEND_RESULT:
            if not self.device_answer(d, st, kind, body):
                self.fail("%s/%s: a SEND_RESULT for a req_id not out" % (d.user, d.name))
        elif kind == ERROR and self.device_answer(d, st, kind, body):
            pass
        elif kind == ERROR:
            code, req = struct.unpack(">HI", body[:6])
            reason = read_str8(body, 6)[0]
            if code == 115:
                self.note("%s/%s: ERROR 115 %s" % (d.user, d.name, reason))
            else:
                self.fail("%s/%s: ERROR %d req %d: %s" % (d.user, d.name, code, req, reason))
        elif kind == CLOSE:
            code = struct.unpack(">H", body[:2])[0]
            reason = read_str8(body, 2)[0]
            if code == 4008 and st.get("replaced"):
                pass
            elif code == 4007 and st["ack_mode"] != "never":
                self.note("%s/%s: CLOSE 4007 acking %s" % (d.user, d.name, st["ack_mode"]))
            elif code not in (1001, 4007, 1013):
                self.fail("%s/%s: CLOSE %d %s" % (d.user, d.name, code, reason))
            raise Closed("CLOSE %d" % code)
        else:
            self.fail("%s/%s: unexpected frame 0x%02x" % (d.user, d.name, kind))

    def ack_target(self, d, st):
        with self.lock:
            return min(self.have(d), st["head"])

    def maybe_fetch(self, d, c, st, rng):
        have = self.ack_target(d, st)
        if st["synced"] and not st["fetching"] and have >= st["page_end"] and st["page_end"] < st["head"]:
            st["req"] += 1
            c.send(FETCH, struct.pack(">IQH", st["req"], have, rng.choice([1, 5, 50, 1000])))
            st["fetching"] = True
            st["acked"] = max(st["acked"], have)

    def device_session(self, d, rng, seconds):
        have = self.have(d)
        x = rng.random()
        if x < 0.1:
            last_seq = rng.randint(0, have)  # stale
        elif x < 0.15:
            last_seq = have + rng.randint(1000, 1 << 40)  # from another inbox
        else:
            last_seq = have
        st = new_state(last_seq, rng.choice(["prompt", "prompt", "batch", "late", "never"]))
        c = self.connect(d.user, d.name, last_seq, give_up=self.calm.is_set, ws=rng.random() < 0.25, dev=d)
        if c is None:
            return
        end = time.time() + seconds
        last_ack = time.time()
        try:
            while time.time() < end and not self.calm.is_set():
                if rng.random() < 0.01:
                    time.sleep(rng.uniform(0.3, 3))  # a stalled reader
                f = c.recv(0.03)
                if f is not None:
                    self.session_frames(d, c, f, st)
                self.device_sends(d, c, st, rng)
                if not st["synced"]:
                    continue
                target = self.ack_target(d, st)
                mode = st["ack_mode"]
                due = target > st["acked"] and (
                    (mode == "prompt" and (f is None or st["unacked"] >= rng.randint(1, 8)))
                    or (mode == "batch" and (st["unacked"] >= 32 or target >= st["page_end"]))
                    or (mode == "late" and time.time() - last_ack > rng.uniform(0.3, 3))
                )
                if due:
                    c.send(ACK, struct.pack(">Q", target))
                    st["acked"], st["unacked"], last_ack = target, 0, time.time()
                if mode != "never":
                    self.maybe_fetch(d, c, st, rng)
                if rng.random() < 0.003 and not st["fetching"]:
                    # A FETCH from an arbitrary position at or below what it holds.
                    st["req"] += 1
                    c.send(FETCH, struct.pack(">IQH", st["req"], rng.randint(0, target), rng.choice([1, 7, 200])))
                    st["fetching"] = True
                if not d.cap and rng.random() < 0.0005:
                    # Forgotten while connected (signed out on the app's
                    # backend while the connection goes on): the
                    # connection may skip what the other devices
                    # acknowledge (15.2), its ACKs bring nothing back, and
                    # its next login is a new device's.
                    self.sign_out(d)
                    self.forgets_connected += 1
                if rng.random() < 0.002:
                    # A network change: the app logs in on a new connection
                    # while the old one lingers (15.2): the old one is
                    # closed with 4008, and what it had in flight comes
                    # again on the new one.
                    last_seq = self.have(d)
                    c2 = self.connect(d.user, d.name, last_seq, give_up=self.calm.is_set, ws=rng.random() < 0.25, dev=d)
                    if c2 is None:
                        break
                    self.drain_replaced(d, c, st)
                    self.replaced += 1
                    c, st = c2, new_state(last_seq, rng.choice(["prompt", "batch", "late"]))
                    last_ack = time.time()
            c.close(reset=rng.random() < 0.5)  # killed with whatever is unacknowledged
        except Closed:
            c.close()

    def device_send(self, d, c, st, m):
        """A SEND_EX of device `d`'s own (to its user or another)."""
        if st["sent"] is None:
            d.conns += 1
            st["sent"] = [("%s/%s" % (d.user, d.name), d.conns), 0]
        st["next_req"] += 1
        self.send_msg(c, m, st["next_req"], st["out"], st["sent"])

    def device_sends(self, d, c, st, rng):
        """Sends again what the device has unanswered, and now and then a new one."""
        if st["sent"] is None:
            for m in list(d.outbox):
                self.device_send(d, c, st, m)
        if not self.stop_sending.is_set() and len(st["out"]) < 4 and rng.random() < 0.01:
            to = d.user if rng.random() < 0.5 else rng.choice(NORMAL_USERS)
            m = self.new_msg(to, "d", d.user, client_id=rng.getrandbits(63) | 1)
            d.outbox.append(m)
            self.device_send(d, c, st, m)

    def device_answer(self, d, st, kind, body):
        """A SEND_RESULT or ERROR for a SEND_EX of the device; False if it is not one."""
        req = struct.unpack(">I", body[:4])[0] if kind == SEND_RESULT else struct.unpack(">I", body[2:6])[0]
        m = st["out"].pop(req, None)
        if m is None:
            return False
        if kind == SEND_RESULT:
            _, outcome, seq, msg_id, _ = struct.unpack(">IBQQI", body)
            if outcome == 2:
                self.fail("%s/%s: %s relayed, not stored" % (d.user, d.name, m.payload[:24]))
            else:
                self.answered(m, seq, msg_id, outcome == 1)
            if m in d.outbox:
                d.outbox.remove(m)
            return True
        code = struct.unpack(">H", body[:2])[0]
        if code in (113, 114):
            with self.lock:
                if m.status == "stored":
                    self.failures.append("%s: refused (%d) after it was stored" % (m.payload[:24], code))
                else:
                    m.status = "refused"
            if m in d.outbox:
                d.outbox.remove(m)
        elif code != 115:
            self.fail("%s/%s: ERROR %d to %s: %s" % (d.user, d.name, code, m.payload[:24], read_str8(body, 6)[0]))
            if m in d.outbox:
                d.outbox.remove(m)
        return True

    def drain_replaced(self, d, c, st):
        """Reads the replaced connection until its CLOSE 4008."""
        st["replaced"] = True
        deadline = time.time() + 3
        try:
            while time.time() < deadline:
                f = c.recv(0.1)
                if f is not None:
                    self.session_frames(d, c, f, st)
            self.note("%s/%s: no CLOSE 4008 within 3 s of a second login" % (d.user, d.name))
        except Closed:
            pass
        c.close()

    def catch_up(self, d, rng):
        """After the chaos: log in and read until everything is in."""
        deadline = time.time() + CATCH_UP_S
        slot = self.cap_slots if d.cap else None
        while time.time() < deadline:
            if slot:
                slot.acquire()
            try:
                if self.catch_up_once(d, deadline):
                    return
            finally:
                if slot:
                    slot.release()
            time.sleep(0.1)
        self.fail("%s/%s: did not catch up within %d s (holds up to %d)" % (d.user, d.name, CATCH_UP_S, self.have(d)))

    def catch_up_once(self, d, deadline):
        st = new_state(self.have(d), "prompt")
        c = self.connect(d.user, d.name, st["last_seq"], ws=random.random() < 0.25, dev=d)
        if c is None:
            return False
        quiet_since = time.time()
        try:
            while time.time() < deadline:
                f = c.recv(0.05)
                if f is not None:
                    self.session_frames(d, c, f, st)
                    quiet_since = time.time()
                if not st["synced"]:
                    continue
                target = self.ack_target(d, st)
                if target > st["acked"] and (f is None or st["unacked"] >= 8):
                    c.send(ACK, struct.pack(">Q", target))
                    st["acked"], st["unacked"] = target, 0
                self.maybe_fetch(d, c, st, random)
                if st["page_end"] >= st["head"] and not st["fetching"] and time.time() - quiet_since > 1.5:
                    with self.lock:
                        self.final_head[d.user] = max(self.final_head.get(d.user, 0), st["head"])
                    c.close()
                    return True
        except Closed:
            c.close()
        return False

    # ---- the run -----------------------------------------------------

    def run(self):
        rng = self.rng
        self.start(self.durability)
        for u in NORMAL_USERS:
            for i in range(rng.randint(1, 4)):
                self.devices.append(Device(u, "d%d" % i, False))
        for i in range(rng.randint(34, 37)):
            self.devices.append(Device(CAP_USER, "c%02d" % i, True))
        threads = []
        for d in self.devices:
            threads.append(threading.Thread(target=self.device_loop, args=(d, random.Random(rng.random())), daemon=True))
        senders = [threading.Thread(target=self.sender, args=(u, random.Random(rng.random())), daemon=True) for u in SENDERS]
        senders.append(threading.Thread(target=self.application, args=(random.Random(rng.random()),), daemon=True))
        for u in NORMAL_USERS[:2]:
            threads.append(threading.Thread(target=self.plain_receiver, args=(u, random.Random(rng.random())), daemon=True))
        for t in threads + senders:
            t.start()
        end = time.time() + self.seconds
        while time.time() < end:
            # One kill in five comes right after a start: while the
            # store recovers and every client logs in again.
            time.sleep(rng.uniform(0.02, 0.3) if rng.random() < 0.2 else rng.uniform(0.3, 3.0))
            if self.kind != "disk":
                continue
            how = "term" if rng.random() < 0.2 else "kill"
            if how == "term" and rng.random() < 0.5:
                # A drain cut short by SIGKILL (a service manager's stop timeout).
                self.server.send_signal(signal.SIGTERM)
                time.sleep(rng.uniform(0, 0.3))
                how = "kill"
                self.terms += 1
            self.stop(how)
            if how == "term":
                self.terms += 1
            else:
                self.kills += 1
            time.sleep(rng.uniform(0, 0.3))
            durability = rng.choice(["fsync", "os"]) if rng.random() < 0.3 else self.durability
            if rng.random() < 0.15:
                # Killed again while it starts: the store is opened (the
                # journal replayed, the hot log written into the database)
                # before the ports listen.
                self.start(durability, kill_after=rng.uniform(0, 0.25))
                self.early_kills += 1
            self.start(durability)
        self.stop_sending.set()
        for t in senders:
            t.join(150)
            if t.is_alive():
                self.fail("a sender did not finish within 150 s of the end")
        # The devices' own messages answered before the catch-up (a device
        # done catching up would miss one stored after).
        deadline = time.time() + 120
        while any(d.outbox for d in self.devices) and time.time() < deadline:
            time.sleep(0.1)
        for d in self.devices:
            if d.outbox:
                self.fail("%s/%s: %d of its own messages unanswered for 120 s" % (d.user, d.name, len(d.outbox)))
        self.calm.set()
        for t in threads:
            t.join(CATCH_UP_S + 30)
        if self.server.poll() is None:
            self.check_inboxes()
        alive = self.server.poll() is None
        if not alive:
            self.fail("the server died by itself (exit %s)" % self.server.returncode)
        else:
            self.stop("term")
        self.check()
        self.scan_logs()

    def check_inboxes(self):
        """After the catch-up: what the store says of each inbox (the admin
        API's /api/v1/inbox) against what the devices hold. Each device
        acknowledged all it holds and closed; its position is handed to the
        store at the close (within a tick), so it is what the device holds.
        A user's known devices are at most 32 (15.2)."""
        time.sleep(1.0)
        for user in NORMAL_USERS + [CAP_USER]:
            try:
                with urllib.request.urlopen(
                    "http://127.0.0.1:%d/api/v1/inbox?user=%s" % (self.admin, user), timeout=15
                ) as r:
                    state = json.loads(r.read())
            except (OSError, urllib.error.URLError, ValueError) as e:
                self.fail("%s: /api/v1/inbox failed: %s" % (user, e))
                continue
            if state["head_seq"] != self.final_head.get(user, 0):
                self.fail("%s: the store's head %d, the devices' last SYNC %s" % (user, state["head_seq"], self.final_head.get(user)))
            known = {d["device"]: d["position"] for d in state["devices"]}
            named = [k for k in known if k != ""]
            if len(named) > 32:
                self.fail("%s: %d devices known, past the cap of 32" % (user, len(named)))
            for d in self.devices:
                if d.user != user:
                    continue
                if d.name not in known:
                    if not d.cap:
                        self.fail("%s/%s: not known to the store after its catch-up" % (user, d.name))
                    continue
                want = min(self.have(d), state["head_seq"])
                if known[d.name] != want:
                    self.fail("%s/%s: the store's position %d, the device holds up to %d" % (user, d.name, known[d.name], want))
            self.inbox_checks += 1

    def check(self):
        by_seq = {}  # (user, seq) -> (msg_id, from, payload)
        seq_of_payload = {}
        for d in self.devices:
            for seq, v in d.held.items():
                key = (d.user, seq)
                if key in by_seq and by_seq[key] != v:
                    self.fail("%s seq %d: %s on one device, %s on another" % (d.user, seq, v[2][:24], by_seq[key][2][:24]))
                by_seq[key] = v
        for (user, seq), (msg_id, frm, payload) in sorted(by_seq.items()):
            m = self.msgs.get((user, payload))
            if m is None:
                self.fail("%s seq %d: a payload nobody sent to this user: %r" % (user, seq, payload[:40]))
                continue
            if m.status == "refused":
                self.fail("%s seq %d: %s was refused, and arrived" % (user, seq, payload[:24]))
            if m.status == "decoy":
                self.fail("%s seq %d: %s reused a client id, and arrived" % (user, seq, payload[:24]))
            if m.status == "stored" and m.seq is not None and (m.seq, m.msg_id) != (seq, msg_id):
                self.fail(
                    "%s seq %d msg_id %d: %s was answered seq %d msg_id %d"
                    % (user, seq, msg_id, payload[:24], m.seq, m.msg_id)
                )
            if (m.sender if m.sender != "app" else "") != frm:
                self.fail("%s seq %d: from %r, sent by %s" % (user, seq, frm, m.sender))
            prev = seq_of_payload.get((user, payload))
            if prev is not None and prev != seq:
                self.fail("%s: %s stored twice, seqs %d and %d" % (user, payload[:24], prev, seq))
            seq_of_payload[(user, payload)] = seq
            if m.seq is None:
                m.seq, m.msg_id = seq, msg_id
        ttl_seqs = {(m.to, m.seq) for m in self.msgs.values() if m.ttl_ms and m.seq}
        answered = {(m.to, m.seq): "answered to " + m.payload[:24] for m in self.msgs.values() if m.seq}
        # Every seq up to the head, on every device, unless it could expire.
        for d in self.devices:
            head = self.final_head.get(d.user, 0)
            if d.first_head is None:
                self.fail("%s/%s: never logged in" % (d.user, d.name))
                continue
            missing = [s for s in range(d.first_head + 1, head + 1) if s not in d.held and (d.user, s) not in ttl_seqs]
            for s in missing[:5]:
                v = by_seq.get((d.user, s))
                what = v[2][:24] if v else answered.get((d.user, s), "a seq no device holds")
                self.fail("%s/%s: missing seq %d (%s; life %d from head %d)" % (d.user, d.name, s, what, d.life, d.first_head))
            if len(missing) > 5:
                self.fail("%s/%s: %d more missing" % (d.user, d.name, len(missing) - 5))
            for s in d.held:
                if s > head:
                    self.fail("%s/%s: holds seq %d past the head %d" % (d.user, d.name, s, head))
        # Acknowledged messages nobody got, though a device was there.
        starts = {}
        for d in self.devices:
            if d.life_start is not None:
                starts[d.user] = min(starts.get(d.user, 1e18), d.life_start)
        for m in self.msgs.values():
            if m.status == "stored" and (m.to, m.payload) not in seq_of_payload and not m.ttl_ms:
                if m.sent_t > starts.get(m.to, 1e18) + 1:
                    self.fail("%s: %s acknowledged, never delivered (seq %s)" % (m.to, m.payload[:24], m.seq))
        # One connection's stored SENDs to one user, in the order sent
        # (PROTOCOL.md 7.4): by the index of the attempt that was stored.
        runs = {}
        for m in self.msgs.values():
            if m.status == "stored" and m.stored_at and m.seq:
                runs.setdefault((m.stored_at[0], m.to), []).append((m.stored_at[1], m.seq, m.payload))
        for (conn, to), got in runs.items():
            got.sort()
            for (_, a, pa), (_, b, pb) in zip(got, got[1:]):
                if b <= a:
                    self.fail("%s: %s (seq %d) sent after %s (seq %d) on one connection of %s" % (to, pb[:24], b, pa[:24], a, conn))

        # What connections without a device got as PUSH.
        for user, msg_id, frm, payload in self.pushes:
            if payload == "live only":
                continue
            m = self.msgs.get((user, payload))
            if m is None:
                self.fail("%s (no device): a PUSH nobody sent to this user: %r" % (user, payload[:40]))
            elif m.status in ("refused", "decoy"):
                self.fail("%s (no device): %s was %s, and came as a PUSH" % (user, payload[:24], m.status))
            elif m.msg_id is not None and m.msg_id != msg_id:
                self.fail("%s (no device): %s as PUSH msg_id %d, stored as %d" % (user, payload[:24], msg_id, m.msg_id))

    def scan_logs(self):
        for name in sorted(os.listdir(self.dir)):
            if not name.startswith("server-"):
                continue
            with open(os.path.join(self.dir, name), errors="replace") as f:
                for line in f:
                    if "ERROR" in line or "panicked" in line or "RUST_BACKTRACE" in line:
                        self.fail("%s: %s" % (name, line.strip()[:300]))

    def summary(self):
        stored = sum(1 for m in self.msgs.values() if m.status == "stored")
        refused = sum(1 for m in self.msgs.values() if m.status == "refused")
        decoys = sum(1 for m in self.msgs.values() if m.status == "decoy")
        maybe = sum(1 for m in self.msgs.values() if m.status == "maybe")
        return {
            "seed": self.seed, "store": "%s/%s/%d" % (self.kind, self.durability, self.shards),
            "inbox_limit": self.inbox_limit, "max_bytes": self.max_bytes, "window": self.window,
            "kills": self.kills, "terms": self.terms, "early_kills": self.early_kills,
            "logins_tcp": self.logins[0], "logins_ws": self.logins[1], "messages": len(self.msgs), "stored": stored,
            "refused": refused, "maybe": maybe, "devices": len(self.devices), "inbox_frames": self.frames_in,
            "dup_inbox": self.dup_inbox, "held": sum(len(d.held) for d in self.devices),
            "forgets": sum(d.life for d in self.devices), "forgets_connected": self.forgets_connected, "inbox_checks": self.inbox_checks, "replays": self.replays, "reused_ids": decoys, "replaced": self.replaced, "pushes": len(self.pushes),
            "device_sent": sum(1 for m in self.msgs.values() if m.kind == "d"), "failures": len(self.failures),
        }


class SetupError(Exception):
    pass


def new_state(last_seq, ack_mode):
    """A device connection's state: where its pages stand, what it ACKed."""
    return {
        "synced": False, "head": 0, "page_end": 0, "fetching": False, "req": 0, "unacked": 0,
        "acked": 0, "last_seq": last_seq, "ack_mode": ack_mode, "replaced": False,
        "out": {}, "sent": None, "next_req": 1000000,
    }


def listening(port):
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs, one seed each (default 20)")
    ap.add_argument("--seed", type=int, default=1, help="first seed (default 1); run i uses seed + i")
    ap.add_argument("--seconds", type=float, default=30, help="chaos per run before the catch-up (default 30)")
    ap.add_argument("--port", type=int, default=0,
                    help="loopback port (the admin API takes port + 1, WebSocket port + 2); 0: random")
    ap.add_argument("--out", default="chaos-out", help="where failed runs' logs are kept (default chaos-out)")
    ap.add_argument("--bin", default="", help="the switchboard binary (default: build target/release/switchboard)")
    ap.add_argument("--keep-going", action="store_true", help="run every seed even after a failure")
    ap.add_argument("--drop-one-in", type=int, default=0, metavar="N",
                    help="the checks' own test: devices lose one INBOX in N (and ACK past it); a run must fail")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if (
        args.runs < 1
        or args.seconds < 1
        or args.seed < 0
        or args.drop_one_in < 0
        or not (args.port == 0 or 1024 <= args.port <= 65533)
    ):
        ap.print_usage(sys.stderr)
        print("chaos.py: --runs and --seconds at least 1, --seed and --drop-one-in at least 0, --port 1024..65533",
              file=sys.stderr)
        sys.exit(2)
    if args.bin and not os.access(args.bin, os.X_OK):
        print("chaos.py: --bin %s is not an executable" % args.bin, file=sys.stderr)
        sys.exit(2)
    binary = args.bin
    if not binary:
        build = subprocess.run(["cargo", "build", "--release", "-p", "switchboard"], cwd=ROOT)
        if build.returncode != 0:
            print("chaos.py: the build failed", file=sys.stderr)
            sys.exit(3)
        binary = os.path.join(ROOT, "target", "release", "switchboard")
    # Below the ephemeral range by default, where no outgoing connection
    # takes the port between two starts of the server.
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    port = args.port or random.randint(10000, max(10001, low - 3))
    totals = {}
    failed = 0
    for i in range(args.runs):
        seed = args.seed + i
        run = Run(seed, args.seconds, port, port + 1, binary, args.drop_one_in)
        try:
            run.run()
        except SetupError as e:
            print("seed %d: %s" % (seed, e), file=sys.stderr)
            if run.server and run.server.poll() is None:
                run.server.kill()
            sys.exit(3)
        s = run.summary()
        for k in ("kills", "terms", "early_kills", "logins_tcp", "logins_ws", "messages", "stored", "refused", "maybe", "devices", "inbox_frames", "dup_inbox", "forgets", "forgets_connected", "inbox_checks", "replays", "reused_ids", "replaced", "pushes", "device_sent"):
            totals[k] = totals.get(k, 0) + s[k]
        print(json.dumps(s), flush=True)
        if run.failures:
            failed += 1
            keep = os.path.join(args.out, "seed-%d" % seed)
            os.makedirs(args.out, exist_ok=True)
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(run.dir, keep, ignore=shutil.ignore_patterns("data"))
            with open(os.path.join(keep, "failures.txt"), "w") as f:
                f.write("\n".join(run.failures + ["", "notes:"] + run.notes) + "\n")
            for line in run.failures[:30]:
                print("  FAIL " + line, flush=True)
        elif args.verbose:
            for line in run.notes[:20]:
                print("  note " + line)
        shutil.rmtree(run.dir, ignore_errors=True)
        if run.failures and not args.keep_going:
            break
    totals["runs"] = i + 1
    totals["failed_runs"] = failed
    print(json.dumps({"total": totals}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
