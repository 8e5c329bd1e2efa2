#!/usr/bin/env python3
"""A third-party WebSocket client (the `websockets` library) against a
running switchboard server; driven by tests/ws_interop.rs.

Usage: ws_client.py URL USER_A TOKEN_A USER_B TOKEN_B USER_C TOKEN_C IDLE_S

The Rust test reads stdout line by line. Lines that start with an upper-case
word are checkpoints; at two of them the test acts through the server handle
before the script goes on waiting:

  READY   -> the test pushes "rust-push-1" to USER_A
  JOINED  -> the test publishes "rust-room-1" to room "lobby"

Everything else the script checks itself; any failure prints `FAIL: ...` to
stderr and exits 1. Every wait is bounded (RECV_TIMEOUT), so the script
cannot hang even if the server never answers.
"""

import contextlib
import struct
import time
import urllib.parse

import wslib
from wslib import Fail, say

RECV_TIMEOUT = 10.0
ROOM = "lobby"


def connect(url, subprotocols=None):
    """A client connection (a context manager), `subprotocols` offered."""
    kw = {} if subprotocols is None else {"subprotocols": subprotocols}
    return wslib.connect(url, RECV_TIMEOUT, 5, **kw)


def recv_json(ws, what):
    return wslib.recv_json(ws, what, RECV_TIMEOUT)


def expect(ws, ty, what, **fields):
    """The next message must be of type `ty` with the given field values."""
    return wslib.expect(ws, ty, what, RECV_TIMEOUT, **fields)


send_json = wslib.send_json


# ---- the raw frame format (docs/PROTOCOL.md), for switchboard.v1.bin -------

def frame(ftype, body):
    return struct.pack(">IBB", 2 + len(body), 1, ftype) + body


def str8(s):
    b = s.encode()
    return struct.pack(">B", len(b)) + b


def bin_login(user, token):
    t = token.encode()
    return frame(0x01, str8(user) + struct.pack(">H", len(t)) + t)


def bin_send(req_id, to, payload):
    return frame(0x07, struct.pack(">I", req_id) + str8(to) + payload)


def read_str8(body, off):
    n = body[off]
    return body[off + 1:off + 1 + n].decode(), off + 1 + n


def recv_bin(ws, what):
    """One binary message holding exactly one frame: (type, body)."""
    try:
        msg = ws.recv(timeout=RECV_TIMEOUT)
    except TimeoutError:
        raise Fail(f"no message within {RECV_TIMEOUT} s while waiting for {what}")
    if not isinstance(msg, bytes):
        raise Fail(f"expected a binary message ({what}), got text {msg!r}")
    if len(msg) < 6:
        raise Fail(f"{what}: binary message of {len(msg)} bytes is shorter than a frame header")
    length, version, ftype = struct.unpack(">IBB", msg[:6])
    if version != 1 or length + 4 != len(msg):
        raise Fail(f"{what}: message is not exactly one v1 frame: {msg.hex()}")
    return ftype, msg[6:]


# ---- the scenario ----------------------------------------------------------

def main(argv):
    with contextlib.ExitStack() as stack:
        scenario(argv, lambda url, subprotocols=None: stack.enter_context(connect(url, subprotocols)))


def scenario(argv, open_ws):
    if len(argv) != 9:
        raise Fail(f"usage: {argv[0]} URL USER_A TOKEN_A USER_B TOKEN_B USER_C TOKEN_C IDLE_S")
    url, user_a, token_a, user_b, token_b, user_c, token_c, idle_s = argv[1:]
    idle_s = float(idle_s)

    # A: login in the upgrade query, JSON subprotocol asked for by name.
    query = urllib.parse.urlencode({"user": user_a, "token": token_a})
    a = open_ws(f"{url}/?{query}", subprotocols=["switchboard.v1.json"])
    if a.subprotocol != "switchboard.v1.json":
        raise Fail(f"A: server chose subprotocol {a.subprotocol!r}")
    m = expect(a, "login_ok", "A login_ok")
    if not isinstance(m.get("conn_id"), str):
        raise Fail(f"A: conn_id should be a JSON string, got {m}")
    say(f"LOGIN_OK query user={user_a} heartbeat_ms={m['heartbeat_interval_ms']} idle_ms={m['idle_timeout_ms']}")

    # B: no subprotocol offered (the server's default is JSON), login in
    # the first message.
    b = open_ws(url)
    if b.subprotocol is not None:
        raise Fail(f"B: no subprotocol was offered, server chose {b.subprotocol!r}")
    send_json(b, {"type": "login", "user": user_b, "token": token_b})
    expect(b, "login_ok", "B login_ok")
    say(f"LOGIN_OK message user={user_b}")

    # A push from the application, sent by the Rust test through the handle.
    say("READY")
    m = expect(a, "push", "A push from the application", **{"from": ""})
    say(f"PUSH user={user_a} from={m['from']!r} payload={m.get('payload')}")

    # A sends to B.
    send_json(a, {"type": "send", "req_id": 7, "to": user_b, "payload": "hi from A"})
    expect(a, "send_ack", "A send_ack", req_id=7, delivered=1)
    m = expect(b, "push", "B push from A", **{"from": user_a, "payload": "hi from A"})
    say(f"SEND {user_a}->{user_b} delivered=1 payload={m['payload']}")

    # Rooms: both join, A publishes, both get it (the publisher included).
    send_json(a, {"type": "subscribe", "req_id": 8, "room": ROOM})
    expect(a, "room_ack", "A room_ack subscribe", req_id=8, op="subscribed", room=ROOM)
    send_json(b, {"type": "subscribe", "req_id": 9, "room": ROOM})
    expect(b, "room_ack", "B room_ack subscribe", req_id=9, op="subscribed", room=ROOM)
    send_json(a, {"type": "publish", "req_id": 10, "room": ROOM, "payload": "A to the room"})
    # The publisher's own ROOM_MSG and its ROOM_ACK may come in either order.
    got = sorted(recv_json(a, "A room_msg / room_ack")["type"] for _ in range(2))
    if got != ["room_ack", "room_msg"]:
        raise Fail(f"A after publish: expected room_ack and room_msg, got {got}")
    expect(b, "room_msg", "B room_msg from A", room=ROOM, **{"from": user_a, "payload": "A to the room"})
    say("JOINED")
    for who, ws in ((user_a, a), (user_b, b)):
        m = expect(ws, "room_msg", f"{who} room_msg from the application", room=ROOM, **{"from": ""})
        say(f"ROOM_MSG user={who} room={m['room']} payload={m.get('payload')}")

    # Silence: the server pings after heartbeat_interval_ms and closes at
    # idle_timeout_ms unless pongs come back; websockets answers them from
    # its background thread while this one sleeps.
    time.sleep(idle_s)
    for who, ws in ((user_a, a), (user_b, b)):
        send_json(ws, {"type": "ping", "data": "still-there"})
        expect(ws, "pong", f"{who} pong after {idle_s} s of silence", data="still-there")
    say(f"ALIVE after {idle_s}s idle")

    # C: the binary subprotocol, one raw frame per binary message.
    c = open_ws(url, subprotocols=["switchboard.v1.bin"])
    if c.subprotocol != "switchboard.v1.bin":
        raise Fail(f"C: server chose subprotocol {c.subprotocol!r}")
    c.send(bin_login(user_c, token_c))
    ftype, body = recv_bin(c, "C LOGIN_OK")
    if ftype != 0x02 or len(body) != 20:
        raise Fail(f"C: expected LOGIN_OK (0x02, 20-byte body), got type {ftype:#04x} body {body.hex()}")
    conn_id, hb, idle, max_frame = struct.unpack(">QIII", body)
    say(f"LOGIN_OK binary user={user_c} max_frame_bytes={max_frame}")
    send_json(a, {"type": "send", "req_id": 11, "to": user_c, "payload": "A to C"})
    expect(a, "send_ack", "A send_ack to C", req_id=11, delivered=1)
    ftype, body = recv_bin(c, "C PUSH from A")
    if ftype != 0x06:
        raise Fail(f"C: expected PUSH (0x06), got {ftype:#04x} {body.hex()}")
    frm, off = read_str8(body, 8)
    if frm != user_a or body[off:] != b"A to C":
        raise Fail(f"C: PUSH from {frm!r} payload {body[off:]!r}")
    c.send(bin_send(12, user_a, b"\xffC to A\x00"))
    ftype, body = recv_bin(c, "C SEND_ACK")
    if ftype != 0x08 or struct.unpack(">II", body) != (12, 1):
        raise Fail(f"C: expected SEND_ACK(12, 1), got {ftype:#04x} {body.hex()}")
    # Not UTF-8, so the JSON side carries it as payload_b64.
    expect(a, "push", "A push from C (binary payload)", **{"from": user_c, "payload_b64": "/0MgdG8gQQA="})
    say(f"BINARY {user_a}<->{user_c} ok")

    for ws in (a, b, c):
        ws.close(1000, "bye")
    for who, ws in ((user_a, a), (user_b, b), (user_c, c)):
        if ws.close_code != 1000:
            raise Fail(f"{who}: closing handshake ended with code {ws.close_code!r}, expected 1000")
    say("DONE")


if __name__ == "__main__":
    wslib.run(main)
