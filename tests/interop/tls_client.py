#!/usr/bin/env python3
"""Clients of Switchboard through its TLS front (nginx on tuning/nginx-tls.conf):
a browser-style wss:// client (the `websockets` library) and a raw-protocol
client over TLS (Python's ssl module); driven by tests/tls_front.rs, which
starts the server and nginx.

Usage: tls_client.py WSS_URL TLS_HOST:PORT CA_FILE USER_A TOKEN_A USER_B TOKEN_B IDLE_S

Both verify the front's certificate against CA_FILE (the test's own CA, for
127.0.0.1). USER_A comes over wss://, USER_B over raw TLS.

Checkpoints on stdout (the test acts at READY):

  WSS_LOGIN_OK USER_A tls=VERSION   logged in over wss://
  TLS_LOGIN_OK USER_B tls=VERSION   logged in over TLS to the raw port
  READY          -> the test pushes "pushed-to-A" to USER_A and
                    "pushed-to-B" to USER_B
  PUSHES ok      both arrived, each through the front
  SEND A->B ok   USER_A's SEND (JSON over wss) reached USER_B (raw over TLS)
  ALIVE ...      both still up after IDLE_S seconds of silence (server
                 PINGs and the clients' PONGs pass through the front)
  DONE           both closed with CLOSE 1000

Any failure prints `FAIL: ...` to stderr and exits 1; every wait is bounded.
"""

import inspect
import json
import socket
import ssl
import struct
import time
import urllib.parse

import wslib
from wslib import Fail, say

TIMEOUT = 10.0
LOGIN, LOGIN_OK, LOGIN_ERROR, PING, PONG, PUSH, SEND, SEND_ACK, MESSAGE, CLOSE = range(1, 11)


def frame(ftype, body=b""):
    return struct.pack(">IBB", 2 + len(body), 1, ftype) + body


def str8(b):
    return bytes([len(b)]) + b


class RawTls:
    """The raw protocol over a TLS socket, answering PINGs as it reads."""

    def __init__(self, hostport, ctx):
        host, port = hostport.rsplit(":", 1)
        plain = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        self.sock = ctx.wrap_socket(plain, server_hostname=host)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def read_frame(self, deadline):
        while True:
            if len(self.buf) >= 6:
                length, = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + length:
                    ftype, body = self.buf[5], self.buf[6:4 + length]
                    self.buf = self.buf[4 + length:]
                    return ftype, body
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Fail("raw TLS connection closed by the front")
            self.buf += chunk

    def next_frame(self, what, timeout=TIMEOUT):
        """The next frame that is not a PING (PINGs are answered)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ftype, body = self.read_frame(deadline)
            except (TimeoutError, socket.timeout):
                raise Fail(f"raw TLS: nothing within {timeout} s while waiting for {what}")
            if ftype == PING:
                self.send(frame(PONG, body))
                continue
            return ftype, body


def wss_connect(url, ctx):
    params = inspect.signature(wslib.ws_connect).parameters
    key = "ssl" if "ssl" in params else "ssl_context"
    return wslib.connect(url, TIMEOUT, 5, subprotocols=["switchboard.v1.json"], **{key: ctx})


def recv_json(ws, what):
    try:
        return json.loads(ws.recv(timeout=TIMEOUT))
    except TimeoutError:
        raise Fail(f"wss: nothing within {TIMEOUT} s while waiting for {what}")


def expect_json(ws, ty, what):
    m = recv_json(ws, what)
    if m.get("type") != ty:
        raise Fail(f"wss: {what}: expected {ty}, got {m}")
    return m


def run(wss_url, tls_addr, ca_file, user_a, token_a, user_b, token_b, idle_s):
    ctx = ssl.create_default_context(cafile=ca_file)
    query = urllib.parse.urlencode({"user": user_a, "token": token_a})
    with wss_connect(f"{wss_url}?{query}", ctx) as ws:
        expect_json(ws, "login_ok", "LOGIN_OK over wss")
        tls_version = ws.socket.version() if hasattr(ws.socket, "version") else "?"
        say(f"WSS_LOGIN_OK {user_a} tls={tls_version}")

        raw = RawTls(tls_addr, ctx)
        tok = token_b.encode()
        raw.send(frame(LOGIN, str8(user_b.encode()) + struct.pack(">H", len(tok)) + tok))
        ftype, body = raw.next_frame("LOGIN_OK over raw TLS")
        if ftype != LOGIN_OK:
            raise Fail(f"raw TLS: expected LOGIN_OK, got type {ftype}: {body!r}")
        say(f"TLS_LOGIN_OK {user_b} tls={raw.sock.version()}")

        say("READY")
        m = expect_json(ws, "push", "the test's push over wss")
        if m.get("payload") != "pushed-to-A":
            raise Fail(f"wss push: {m}")
        ftype, body = raw.next_frame("the test's push over raw TLS")
        if ftype != PUSH or not body.endswith(b"pushed-to-B"):
            raise Fail(f"raw TLS push: type {ftype}: {body!r}")
        say("PUSHES ok")

        ws.send(json.dumps({"type": "send", "req_id": 1, "to": user_b, "payload": "from A over wss"}))
        ftype, body = raw.next_frame("A's SEND, over raw TLS")
        n = body[8]
        if ftype != PUSH or body[9:9 + n] != user_a.encode() or body[9 + n:] != b"from A over wss":
            raise Fail(f"raw TLS: expected A's PUSH, got type {ftype}: {body!r}")
        ack = expect_json(ws, "send_ack", "the SEND_ACK over wss")
        if ack.get("delivered") != 1:
            raise Fail(f"send_ack: {ack}")
        say(f"SEND {user_a}->{user_b} ok")

        # Silence: the server pings both every few hundred ms (the test's
        # heartbeat), through nginx; websockets answers by itself, the raw
        # client in next_frame. Then each must still be served.
        end = time.monotonic() + idle_s
        while time.monotonic() < end:
            try:
                raw.next_frame("silence", timeout=max(0.05, end - time.monotonic()))
                raise Fail("raw TLS: a frame arrived during the silence")
            except Fail as e:
                if "nothing within" not in str(e):
                    raise
        ws.send(json.dumps({"type": "ping", "data": "still-there"}))
        if expect_json(ws, "pong", "a pong after the silence").get("data") != "still-there":
            raise Fail("wss: wrong pong data")
        raw.send(frame(PING, b"raw-still-there"))
        ftype, body = raw.next_frame("a PONG after the silence")
        if (ftype, body) != (PONG, b"raw-still-there"):
            raise Fail(f"raw TLS: expected the PONG, got type {ftype}: {body!r}")
        say(f"ALIVE after {idle_s}s idle")

        raw.send(frame(CLOSE, struct.pack(">H", 1000) + str8(b"bye")))
        ftype, body = raw.next_frame("the server's CLOSE")
        if ftype != CLOSE or struct.unpack(">H", body[:2])[0] != 1000:
            raise Fail(f"raw TLS: expected CLOSE 1000, got type {ftype}: {body!r}")
        raw.sock.close()
    say("DONE")


def main(argv):
    if len(argv) != 9:
        raise Fail(f"usage: {argv[0]} WSS_URL TLS_HOST:PORT CA_FILE USER_A TOKEN_A USER_B TOKEN_B IDLE_S")
    run(*argv[1:8], float(argv[8]))


if __name__ == "__main__":
    wslib.run(main)
