#!/usr/bin/env python3
"""Reliable delivery (docs/PROTOCOL.md section 15) over WebSocket JSON with
the `websockets` library: a device that drops its connection with messages
unacknowledged, while more are stored for it, resumes where it left off;
driven by tests/ws_interop.rs.

Usage: ws_reliable.py URL USER TOKEN DEVICE FIRST_PAGE

The client does what section 15 asks of one: it keeps the messages it
received by seq, drops a seq it already has (and then acknowledges again:
its ACK was lost or late), acknowledges cumulatively (after 32 messages or
100 ms, and at the end of a page), logs in with the highest seq it has
stored as `last_seq`, and FETCHes while a SYNC says more remain.

Checkpoints on stdout (the test acts at those marked ->, and answers on
stdin where marked <-):

  LIVE           -> DEVICE logged in with nothing stored (SYNC 0 0 0); the
                    test stores r1..r10 (Handle::push_reliable)
  OFFLINE ...    -> it stored r1..r10 as they came, acknowledged only up to
                    6 and closed; the test checks that the server's
                    position is 6 and stores r11..r40 while it is away
                 <- PUSHED 40
  RESUMED ...    logged in again with last_seq 10 (sent as a JSON integer):
                 SYNC position 10 (last_seq moved the server's 6 forward),
                 head 40, page_end 10 + FIRST_PAGE
  CAUGHT_UP ...  -> FETCHed page by page (limit 10) up to the head: it has
                    r1..r40, each arrived once, in order; the test checks
                    the position (40) and stores r41
  LIVE_AGAIN r41 it came at once, with no FETCH: the connection is live
  DONE

Any failure prints `FAIL: ...` to stderr and exits 1. Every wait is
bounded.
"""

import contextlib
import time

import wslib
from wslib import Fail, say

RECV_TIMEOUT = 10.0
ACK_EVERY = 32
ACK_AFTER_S = 0.1
FETCH_LIMIT = 10


class Device:
    """One install of an app: what it stored survives its connections."""

    def __init__(self, open_ws, user, token, device):
        self.open_ws, self.user, self.token, self.device = open_ws, user, token, device
        self.stored = {}  # seq -> payload
        self.last_seq = 0  # the highest seq stored
        self.arrivals = []  # every INBOX seq received, copies included
        self.duplicates = 0
        self.ws = None
        self.acked = 0
        self.unacked_since = None
        self.fetches = 0
        self.syncs = []

    def login(self, last_seq):
        self.ws = self.open_ws()
        wslib.send_json(self.ws, {"type": "login", "user": self.user, "token": self.token,
                                  "device": self.device, "last_seq": last_seq})
        wslib.expect(self.ws, "login_ok", "login_ok", RECV_TIMEOUT)
        self.acked = 0
        self.unacked_since = None
        sync = self.recv("the login SYNC")
        if sync.get("type") != "sync" or sync.get("req_id") != 0:
            raise Fail(f"expected the login SYNC (req_id 0) right after login_ok, got {sync}")
        return sync

    def close(self):
        self.ws.close(1000, "bye")
        if self.ws.close_code != 1000:
            raise Fail(f"closing handshake ended with code {self.ws.close_code!r}")
        self.ws = None

    def recv(self, what):
        """The next message; INBOX and SYNC are taken in on the way."""
        m = wslib.recv_json(self.ws, what, RECV_TIMEOUT)
        if m.get("type") == "sync":
            # Every 64-bit field is a decimal string (section 13.4).
            for k in ("position", "head_seq", "page_end"):
                if not isinstance(m.get(k), str):
                    raise Fail(f"sync {k} should be a JSON string: {m}")
            self.syncs.append((m["req_id"], int(m["position"]), int(m["head_seq"]), int(m["page_end"])))
        elif m.get("type") == "inbox":
            self.take(m)
        return m

    def take(self, m):
        if not isinstance(m.get("seq"), str) or not isinstance(m.get("msg_id"), str):
            raise Fail(f"inbox seq and msg_id should be JSON strings: {m}")
        seq = int(m["seq"])
        self.arrivals.append(seq)
        if seq <= self.last_seq:
            # A copy (retransmit, or a reconnect before the ACK arrived):
            # drop it, but acknowledge again (section 15.8).
            self.duplicates += 1
            self.ack()
            return
        self.stored[seq] = m.get("payload")
        self.last_seq = seq
        if self.unacked_since is None:
            self.unacked_since = time.monotonic()

    def ack(self, upto=None):
        seq = self.last_seq if upto is None else upto
        wslib.send_json(self.ws, {"type": "ack", "seq": str(seq)})
        self.acked = seq
        self.unacked_since = None

    def ack_if_due(self):
        """Batched ACKs: after ACK_EVERY messages or ACK_AFTER_S seconds."""
        if self.last_seq > self.acked and (self.last_seq - self.acked >= ACK_EVERY or
                                           time.monotonic() - self.unacked_since >= ACK_AFTER_S):
            self.ack()

    def catch_up(self):
        """Reads pages, FETCHing the next one when a page is stored, until a
        SYNC's page_end reaches its head and that page is in."""
        end = time.monotonic() + RECV_TIMEOUT
        while True:
            _, _, head, page_end = self.syncs[-1]
            if self.last_seq >= page_end:
                if page_end >= head:
                    if self.last_seq > self.acked:
                        self.ack()  # the end of the last page
                    return
                # The page is stored: FETCH the next, which acknowledges it.
                self.fetches += 1
                n = len(self.syncs)
                wslib.send_json(self.ws, {"type": "fetch", "req_id": 100 + self.fetches,
                                          "after_seq": str(self.last_seq), "limit": FETCH_LIMIT})
                self.acked = self.last_seq
                self.unacked_since = None
                while len(self.syncs) == n:
                    self.expect_inbox_or_sync(f"the SYNC answering FETCH {100 + self.fetches}")
                if self.syncs[-1][0] != 100 + self.fetches:
                    raise Fail(f"SYNC {self.syncs[-1]} does not answer FETCH {100 + self.fetches}")
                continue
            if time.monotonic() > end:
                raise Fail(f"catching up took over {RECV_TIMEOUT} s: have {self.last_seq}, syncs {self.syncs}")
            self.expect_inbox_or_sync(f"INBOX up to {page_end}")
            self.ack_if_due()

    def expect_inbox_or_sync(self, what):
        m = self.recv(what)
        if m.get("type") not in ("inbox", "sync"):
            raise Fail(f"{what}: unexpected {m}")


def main(argv):
    if len(argv) != 6:
        raise Fail(f"usage: {argv[0]} URL USER TOKEN DEVICE FIRST_PAGE")
    url, user, token, device, first_page = argv[1:]
    with contextlib.ExitStack() as stack:
        def open_ws():
            return stack.enter_context(wslib.connect(url, RECV_TIMEOUT, 5, subprotocols=["switchboard.v1.json"]))
        scenario(Device(open_ws, user, token, device), int(first_page))


def scenario(d, first_page):
    # A new install: nothing stored, nothing waiting.
    sync = d.login("0")
    if d.syncs != [(0, 0, 0, 0)]:
        raise Fail(f"a first login to an empty inbox: expected SYNC 0 0 0, got {sync}")
    say("LIVE")

    # Ten arrive live; it stores them all, acknowledges 6, and the
    # connection ends before the rest is acknowledged.
    while d.last_seq < 10:
        d.expect_inbox_or_sync("r1..r10, live")
    if d.arrivals != list(range(1, 11)):
        raise Fail(f"live: expected seqs 1..10, got {d.arrivals}")
    d.ack(6)
    # An ACK is not answered: a ping behind it shows the server has read it.
    wslib.send_json(d.ws, {"type": "ping", "data": "acked"})
    wslib.expect(d.ws, "pong", "the pong after ACK 6", RECV_TIMEOUT, data="acked")
    d.close()
    say(f"OFFLINE stored={d.last_seq} acked=6")

    total = int(wslib.wait_for_test("PUSHED", 30).split()[1])

    # Back with the highest seq it stored: the server skips 7..10 although
    # they were never acknowledged, and pages the rest.
    d.arrivals = []
    d.syncs = []
    d.login(d.last_seq)
    want = (0, 10, total, min(10 + first_page, total))
    if d.syncs != [want]:
        raise Fail(f"resume: expected SYNC (req_id, position, head, page_end) {want}, got {d.syncs[-1]}")
    if want[3] >= total:
        raise Fail(f"the test should leave more than the first page ({first_page}) waiting, not {total - 10}")
    say(f"RESUMED position=10 head={total} page_end={want[3]}")

    d.catch_up()
    if d.arrivals != list(range(11, total + 1)):
        raise Fail(f"resume: expected seqs 11..{total} once each, in order, got {d.arrivals}")
    payloads = [d.stored.get(s) for s in range(1, total + 1)]
    if payloads != [f"r{i}" for i in range(1, total + 1)]:
        raise Fail(f"stored after dedup: {payloads}")
    pages = len(d.syncs)  # the login's and one per FETCH
    say(f"CAUGHT_UP have={d.last_seq} pages={pages} fetches={d.fetches} duplicates={d.duplicates}")

    m = d.recv(f"r{total + 1}, live")
    if m.get("type") != "inbox" or m.get("seq") != str(total + 1) or m.get("payload") != f"r{total + 1}":
        raise Fail(f"expected INBOX seq {total + 1} (r{total + 1}) with no FETCH, got {m}")
    d.ack()
    say(f"LIVE_AGAIN {m['payload']}")
    d.close()
    say("DONE")


if __name__ == "__main__":
    wslib.run(main)
