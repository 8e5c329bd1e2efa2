"""What the interoperability scripts share: the `websockets` import with a
clear message when it is missing, the failure type, line-buffered output,
and a client connection set up for a loopback test."""

import inspect
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
