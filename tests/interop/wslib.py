"""What the interoperability scripts share: the `websockets` import with a
clear message when it is missing, the failure type, line-buffered output,
the test's answers on stdin, a client connection set up for a loopback
test, and JSON messages with bounded waits."""

import inspect
import json
import select
import sys

try:
    from websockets.sync.client import connect as ws_connect
except ImportError as e:  # the Rust test checks this first; keep a clear message anyway
    print(f"FAIL: python3 cannot import websockets.sync.client ({e}); run scripts/test.sh or `pip install websockets`",
          file=sys.stderr)
    sys.exit(2)


class Fail(Exception):
    pass


def say(*parts):
    print(*parts, flush=True)


def wait_for_test(word, timeout):
    """Waits (at most `timeout` s) for the Rust test's next line on stdin
    (`Script::tell`), which must start with `word`; returns the line."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        raise Fail(f"the test did not say {word} within {timeout} s")
    line = sys.stdin.readline().strip()
    if not line.startswith(word):
        raise Fail(f"expected {word} from the test, got {line!r}")
    return line


def recv_json(ws, what, timeout):
    try:
        msg = ws.recv(timeout=timeout)
    except TimeoutError:
        raise Fail(f"no message within {timeout} s while waiting for {what}")
    if not isinstance(msg, str):
        raise Fail(f"expected a text message ({what}), got binary {msg!r}")
    return json.loads(msg)


def expect(ws, ty, what, timeout, **fields):
    """The next message must be of type `ty` with the given field values."""
    m = recv_json(ws, what, timeout)
    if m.get("type") != ty:
        raise Fail(f"{what}: expected {ty}, got {m}")
    for k, v in fields.items():
        if m.get(k) != v:
            raise Fail(f"{what}: expected {k}={v!r}, got {m}")
    return m


def send_json(ws, obj):
    ws.send(json.dumps(obj))


def connect(url, open_timeout, close_timeout, **kw):
    """A connection, as a context manager (websockets 17 deprecates using
    connect() directly). Proxies and client-side keepalive pings are off
    where the installed websockets has those options: the server's own pings
    are what the tests exercise, and a proxy from the environment must not
    sit between a test and 127.0.0.1."""
    params = inspect.signature(ws_connect).parameters
    kw.update(open_timeout=open_timeout, close_timeout=close_timeout)
    if "proxy" in params:
        kw["proxy"] = None
    if "ping_interval" in params:
        kw["ping_interval"] = None
    return ws_connect(url, **kw)


def run(main):
    """Runs `main(sys.argv)`; any failure is one `FAIL: ...` line on stderr
    and exit status 1, which the Rust test reports."""
    try:
        main(sys.argv)
    except Fail as e:
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as e:  # connection refused, closed by the server, ...
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
