#!/usr/bin/env python3
"""Drives a headless Chromium through the demo page over the Chrome DevTools
Protocol (CDP), with the `websockets` library; driven by tests/ws_interop.rs,
which starts the server and Chromium.

Usage: browser.py DEVTOOLS_WS_URL PAGE_URL USER TOKEN_OR_DASH PEER
       browser.py DEVTOOLS_WS_URL PAGE_URL USER TOKEN_OR_DASH catch-up:N

TOKEN_OR_DASH is "-" when the page should fetch its own token from
/demo/token/USER (the server runs on the development secret), else a token
to paste into the page's token field.

Checkpoints on stdout (the Rust test acts at those marked ->):

  LOGGED_IN USER  the page shows "logged in as USER" (in a 1280x900 window),
                  as this browser's device (its id kept in localStorage)
  INBOX_READY     -> the test stores "inbox-1".."inbox-5" for USER
                  (Handle::push_reliable)
  INBOX_LIVE 5    they show as .msg.inbox entries, and the page saved them
                  with last_seq 5 in localStorage
  RELOADED        -> the page was reloaded (its socket gone with it); the
                  test stores "inbox-6".."inbox-INBOX_N" while no page is
                  connected, more than the server's first page
                  <- PUSHED INBOX_N
  RESUMED ...     logged in again: the page showed the 5 it saved, the
                  login SYNC said how many wait, and after its FETCHes the
                  log holds inbox-1..inbox-INBOX_N, each once, in seq order
                  (-> the test checks the device's ACK position)
  READY           -> the test pushes "rust-push-browser" to USER
  PUSH_SEEN ...   a .msg.push entry with that payload is in #log
  SENT ...        the page sent to PEER, echoed its own message (.msg.sent)
                  and logged the ack (the test checks that PEER, a raw TCP
                  client, got it)
  JOINED          -> the test publishes "rust-room-browser" to room "lobby"
  ROOM_SEEN ...   both that and the page's own publish arrived as .msg.room_msg
  ALIVE ...       the socket is still up after IDLE_S seconds of silence
  FILL            -> the test pushes FILL_N more messages
  NO_PAGE_SCROLL  with them all in #log, the page itself still fits the
                  window: the log scrolls, nothing else does
  DRAIN_ME        -> the test starts a second server on the same WebSocket
                  port and drains the first (CLOSE 1001, reconnect_ms=...)
  RECONNECTED     the page showed the 1001 as information, waited the hint,
                  logged in again and rejoined "lobby" (on the new server)
  ROOM_AFTER ...  -> (before it) the test published "after-reconnect" on the
                  new server; it arrived
  REFUSED_SENDS   an empty recipient, one over 255 bytes and a text over
                  the frame size were refused by the page, still connected
  RESENT ...      -> (before it) the page's connection was cut without a
                  close (its socket muted from inside the page): its own
                  ping went unanswered, it logged in again, and the
                  message typed meanwhile went again and was answered
                  as a duplicate (the test checks PEER's inbox holds it
                  once)
  REFUSED_ONCE    a login with a bad token was refused once, and the page
                  stayed disconnected (no retry of a refused token)
  DONE            disconnected again: the 1000 shown as a normal close, no
                  close shown as an error at any point, and still each inbox
                  message once

With `catch-up:N` instead of PEER, the page only logs in, as a new
device, to an inbox holding N messages on a server whose send budget is
smaller than the FETCHes it takes:

  LOGGED_IN USER  as above
  CAUGHT_UP N     inbox-1..inbox-N shown, each once, in seq order, after
                  at least one FETCH refused with ERROR 118 (shown in the
                  log) and sent again after the wait it named

Any failure prints `FAIL: ...` (with the page's status and log) to stderr
and exits 1. Every wait is bounded.
"""

import json
import time

import wslib
from wslib import Fail, connect, say

WAIT_S = 15.0
PING_MS = 1500
INBOX_LIVE_N = 5
IDLE_S = 2.0
ROOM = "lobby"
FILL_N = 100


class Cdp:
    """One CDP connection to the browser, with one flattened page session."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.session = None
        self.errors = []  # uncaught page exceptions, for the failure report

    def call(self, method, params=None, session=True):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        end = time.monotonic() + WAIT_S
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise Fail(f"no CDP answer to {method} within {WAIT_S} s")
            try:
                m = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                continue
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise Fail(f"CDP {method} failed: {m['error']}")
                return m.get("result", {})
            if m.get("method") == "Runtime.exceptionThrown":
                self.errors.append(m["params"]["exceptionDetails"].get("exception", {}).get("description", "?"))

    def open_page(self):
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def eval(self, expr):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise Fail(f"page script failed: {expr!r}: {r['exceptionDetails'].get('text')} "
                       f"{r['exceptionDetails'].get('exception', {}).get('description', '')}")
        return r.get("result", {}).get("value")

    def wait_for(self, expr, what):
        end = time.monotonic() + WAIT_S
        while time.monotonic() < end:
            v = self.eval(expr)
            if v:
                return v
            time.sleep(0.05)
        raise Fail(f"timed out after {WAIT_S} s waiting for {what}")

    def page_state(self):
        try:
            return self.eval("JSON.stringify({status: document.getElementById('status')?.textContent, "
                             "log: [...document.querySelectorAll('#log .msg')].map(e => e.className + ': ' + "
                             "e.textContent)})")
        except Exception as e:  # the report must not hide the original failure
            return f"(page state unavailable: {e})"


def cdp_connect(url):
    """A context manager for the CDP connection: no proxy, no keepalive
    pings, no message size limit (where the installed websockets has these
    options)."""
    return connect(url, WAIT_S, 2, max_size=None)


def js(s):
    """A JavaScript string literal."""
    return json.dumps(s)


def set_value(cdp, elem_id, value):
    cdp.eval(f"(() => {{ const e = document.getElementById({js(elem_id)}); e.value = {js(value)}; "
             f"e.dispatchEvent(new Event('change')); return true; }})()")


def click(cdp, elem_id):
    ok = cdp.eval(f"(() => {{ const e = document.getElementById({js(elem_id)}); "
                  f"if (!e || e.disabled) return false; e.click(); return true; }})()")
    if not ok:
        raise Fail(f"button #{elem_id} is missing or disabled")


def log_has(kind, needle):
    """A JS expression: some `.msg.KIND` entry in #log contains `needle`."""
    return (f"[...document.querySelectorAll('#log .msg.{kind}')]"
            f".some(e => e.textContent.includes({js(needle)}))")


def count(kind, needle):
    """A JS expression: how many `.msg.KIND` entries in #log contain `needle`."""
    return (f"[...document.querySelectorAll('#log .msg.{kind}')]"
            f".filter(e => e.textContent.includes({js(needle)})).length")


# The total the test stored, from its PUSHED answer.
INBOX_TOTAL = [0]

INBOX_SEQS = ("[...document.querySelectorAll('#log .msg.inbox')].map(e => "
              "/#(\\d+) from the server: (.*)$/.exec(e.textContent)?.slice(1).join(' ') ?? e.textContent)")


def check_inbox_once_in_order(cdp, n):
    """#log (newest first) holds inbox-1..inbox-n, each once, in seq order."""
    got = cdp.eval(INBOX_SEQS)
    want = [f"{i} inbox-{i}" for i in range(n, 0, -1)]
    if got != want:
        raise Fail(f"the inbox entries should be seqs {n}..1, each once, newest first; got {got}")


def log_in(cdp, user, token):
    set_value(cdp, "user", user)  # its change handler clears the token field
    if token != "-":
        set_value(cdp, "token", token)
    click(cdp, "connect")
    want = f"logged in as {user}"
    cdp.wait_for(f"document.getElementById('status').textContent === {js(want)} && "
                 "document.getElementById('status').className === 'on'", f"status {want!r}")


def reliable_across_a_reload(cdp, page_url, user, token):
    device = cdp.eval("document.getElementById('device').textContent")
    if not device or device != cdp.eval("localStorage.getItem('switchboard.device')"):
        raise Fail(f"the page should show its device id, kept in localStorage: {device!r}")
    say("INBOX_READY")
    cdp.wait_for(f"document.querySelectorAll('#log .msg.inbox').length === {INBOX_LIVE_N}",
                 f"{INBOX_LIVE_N} .msg.inbox entries")
    check_inbox_once_in_order(cdp, INBOX_LIVE_N)
    key = f"switchboard.inbox.{device}.{user}"
    cdp.wait_for(f"JSON.parse(localStorage.getItem({js(key)}) || '{{}}').last_seq === '{INBOX_LIVE_N}'",
                 f"last_seq {INBOX_LIVE_N} saved in localStorage")
    say(f"INBOX_LIVE {INBOX_LIVE_N}")

    cdp.eval("window.beforeReload = true")
    cdp.call("Page.reload", {"ignoreCache": True})
    cdp.wait_for("!window.beforeReload && document.readyState === 'complete' && "
                 "!!document.getElementById('connect')", "the reloaded page")
    if cdp.eval("document.getElementById('device').textContent") != device:
        raise Fail("the device id changed across a reload")
    say("RELOADED")
    total = int(wslib.wait_for_test("PUSHED", WAIT_S).split()[1])
    INBOX_TOTAL[0] = total

    log_in(cdp, user, token)
    waiting = f"inbox: {total - INBOX_LIVE_N} message(s) waiting after #{INBOX_LIVE_N}"
    cdp.wait_for(log_has("info", waiting), f"the login SYNC shown as {waiting!r}")
    cdp.wait_for(f"document.querySelectorAll('#log .msg.inbox').length >= {total}", f"{total} .msg.inbox entries")
    check_inbox_once_in_order(cdp, total)
    say(f"RESUMED {total} once in order")


def open_demo_page(cdp, page_url):
    cdp.open_page()
    # The size the page must fit without a scrollbar of its own.
    cdp.call("Emulation.setDeviceMetricsOverride",
             {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    cdp.call("Page.navigate", {"url": page_url})
    cdp.wait_for(f"document.readyState === 'complete' && location.href === {js(page_url)} && "
                 "!!document.getElementById('connect')", f"the demo page at {page_url}")
    # The page's own ping after PING_MS of silence (25 s by default), read
    # at load: reload so that it takes this one.
    cdp.eval(f"localStorage.setItem('switchboard.ping_ms', '{PING_MS}')")
    cdp.eval("window.beforeReload = true")
    cdp.call("Page.reload", {"ignoreCache": True})
    cdp.wait_for("!window.beforeReload && document.readyState === 'complete' && "
                 "!!document.getElementById('connect')", "the page reloaded with its ping interval")


def catch_up(cdp, page_url, user, token, n):
    open_demo_page(cdp, page_url)
    log_in(cdp, user, token)
    say(f"LOGGED_IN {user}")
    cdp.wait_for(f"document.querySelectorAll('#log .msg.inbox').length >= {n}", f"{n} .msg.inbox entries")
    check_inbox_once_in_order(cdp, n)
    if not cdp.eval(log_has("error", "error 118: rate limited")):
        raise Fail("no FETCH was refused: the server's budget should not cover this catch-up")
    if cdp.errors:
        raise Fail(f"uncaught exceptions in the page: {cdp.errors}")
    say(f"CAUGHT_UP {n}")


def run(cdp, page_url, user, token, peer):
    open_demo_page(cdp, page_url)
    log_in(cdp, user, token)
    say(f"LOGGED_IN {user}")

    reliable_across_a_reload(cdp, page_url, user, token)

    say("READY")
    cdp.wait_for(log_has("push", "rust-push-browser"), "a .msg.push entry with rust-push-browser")
    say("PUSH_SEEN rust-push-browser")

    text = f"hello {peer} from the browser"
    set_value(cdp, "to", peer)
    set_value(cdp, "text", text)
    click(cdp, "send")
    cdp.wait_for(log_has("sent", f"to {peer} (request 1): {text}"), "the page's echo of its own send")
    cdp.wait_for(log_has("ack", "delivered to 1 connection"), "the send ack")
    say(f"SENT {text}")

    set_value(cdp, "room", ROOM)
    click(cdp, "join")
    cdp.wait_for(log_has("ack", f"subscribed {ROOM}"), f"the ack of joining {ROOM}")
    say("JOINED")
    cdp.wait_for(log_has("room_msg", "rust-room-browser"), "a .msg.room_msg entry with rust-room-browser")
    set_value(cdp, "room-text", "hi all from the browser")
    click(cdp, "publish")
    cdp.wait_for(log_has("room_msg", f"[{ROOM}] {user}: hi all from the browser"),
                 "the page's own publish as a .msg.room_msg entry")
    say("ROOM_SEEN rust-room-browser, hi all from the browser")

    # Silence on the socket: the server pings it several times (the test
    # runs with 300 ms heartbeats) and closes it unless Chromium pongs.
    time.sleep(IDLE_S)
    set_value(cdp, "room-text", "still here")
    click(cdp, "publish")
    cdp.wait_for(log_has("room_msg", f"[{ROOM}] {user}: still here"), f"a publish after {IDLE_S} s of silence")
    if cdp.eval("document.querySelectorAll('#log .msg.closed').length") != 0:
        raise Fail("the socket closed during the silence")
    say(f"ALIVE after {IDLE_S}s idle")

    say("FILL")
    cdp.wait_for(f"{count('push', 'fill-')} === {FILL_N}", f"{FILL_N} more pushes")
    fits = cdp.eval("(() => { const d = document.documentElement; return [d.scrollWidth, d.scrollHeight, "
                    "innerWidth, innerHeight, document.getElementById('log').scrollHeight]; })()")
    if fits[0] > fits[2] or fits[1] > fits[3]:
        raise Fail(f"the page scrolls at 1280x900: content {fits[0]}x{fits[1]}, window {fits[2]}x{fits[3]}")
    if fits[4] <= fits[3]:
        raise Fail(f"the log should be taller than the window by now ({fits[4]} px): the test proves nothing")
    scrolling = cdp.eval("[...document.querySelectorAll('body *')].filter(e => e.id !== 'log' && "
                         "['auto', 'scroll'].includes(getComputedStyle(e).overflowY) && "
                         "e.scrollHeight > e.clientHeight + 1).map(e => e.tagName + ' ' + e.scrollHeight + '>' + "
                         "e.clientHeight)")
    if scrolling:
        raise Fail(f"a scrollbar besides the log's at 1280x900: {scrolling}")
    say("NO_PAGE_SCROLL")

    say("DRAIN_ME")
    cdp.wait_for(f"{count('info', 'closed: 1001')} === 1 && {count('info', 'reconnect_ms=')} === 1",
                 "the drain's 1001 with its hint, shown as information")
    want = f"logged in as {user}"
    cdp.wait_for(f"{count('login_ok', want)} === 2 && document.getElementById('status').textContent === {js(want)}",
                 "a second login after the hinted delay")
    cdp.wait_for(f"{count('ack', 'subscribed ' + ROOM)} === 2", f"{ROOM} joined again after the reconnect")
    say("RECONNECTED")
    cdp.wait_for(log_has("room_msg", "after-reconnect"), "a room message on the new server")
    say("ROOM_AFTER after-reconnect")

    # What the server would close the connection for is refused by the
    # page itself, which stays connected.
    for to, text, why in [("", "hi", "enter a recipient"), ("x" * 256, "hi", "longer than 255 bytes"),
                          (peer, "y" * 70000, "at most 65536 fit")]:
        set_value(cdp, "to", to)
        set_value(cdp, "text", text)
        click(cdp, "send")
        cdp.wait_for(log_has("error", f"not sent: ") + " && " + log_has("error", why), f"the page refusing: {why}")
    if cdp.eval("document.getElementById('status').className") != "on":
        raise Fail("the page disconnected over a send it should have refused itself")
    say("REFUSED_SENDS")

    # A path that dies on the way in, without a close (what a network
    # change can leave): what the page sends arrives, nothing it is sent
    # does. A message typed now is stored, its answer lost; the page's ping
    # goes unanswered, it takes the connection for dead and logs in again,
    # and sends the message again with its client_id: stored once.
    logins = cdp.eval(count("login_ok", f"logged in as {user}"))
    cdp.eval("ws.onmessage = () => {}; true")
    set_value(cdp, "to", peer)
    set_value(cdp, "text", "typed while cut off")
    click(cdp, "send")
    cdp.wait_for(log_has("info", "no answer to a ping"), "the page to take the cut connection for dead")
    cdp.wait_for(f"{count('login_ok', f'logged in as {user}')} === {logins + 1}", "a login after the dead path")
    cdp.wait_for(log_has("sent", "(request") + " && " + log_has("sent", "no answer before the reconnect): typed while cut off"),
                 "the unanswered send, sent again")
    cdp.wait_for(log_has("ack", "duplicate as #1"), "the retry answered as the message stored before")
    cut_closes = cdp.eval("document.querySelectorAll('#log .msg.closed').length")
    say("RESENT typed while cut off")

    click(cdp, "disconnect")
    cdp.wait_for("document.getElementById('status').textContent === 'disconnected' && "
                 "!document.getElementById('connect').disabled", "status 'disconnected'")
    cdp.wait_for(count("info", "closed: 1000"), "the normal close, shown as information")
    if cdp.eval("document.querySelectorAll('#log .msg.closed').length") != cut_closes:
        raise Fail("a close was shown as an error")
    # A refused login stops the page: no reconnect with the same token.
    set_value(cdp, "token", "not-a-token")
    click(cdp, "connect")
    cdp.wait_for(log_has("login_error", "login refused (1)"), "the refused login")
    cdp.wait_for("document.getElementById('status').textContent === 'disconnected' && "
                 "!document.getElementById('connect').disabled", "status 'disconnected' after the refusal")
    time.sleep(2.5)
    attempts = cdp.eval(count("login_error", "login refused"))
    if attempts != 1 or cdp.eval("document.getElementById('status').textContent") != "disconnected":
        raise Fail(f"the page retried a refused token: {attempts} refusals in 2.5 s")
    say("REFUSED_ONCE")
    if cdp.errors:
        raise Fail(f"uncaught exceptions in the page: {cdp.errors}")
    check_inbox_once_in_order(cdp, INBOX_TOTAL[0])
    say("DONE")


def main(argv):
    if len(argv) != 6:
        raise Fail(f"usage: {argv[0]} DEVTOOLS_WS_URL PAGE_URL USER TOKEN_OR_DASH PEER")
    devtools, page_url, user, token, peer = argv[1:]
    with cdp_connect(devtools) as ws:
        cdp = Cdp(ws)
        try:
            if peer.startswith("catch-up:"):
                catch_up(cdp, page_url, user, token, int(peer.split(":", 1)[1]))
            else:
                run(cdp, page_url, user, token, peer)
        except Fail as e:
            raise Fail(f"{e}\n  page: {cdp.page_state()}\n  page exceptions: {cdp.errors}")


if __name__ == "__main__":
    wslib.run(main)
