#!/usr/bin/env python3
"""What nginx as Switchboard's TLS front costs per connection, measured.

Starts a release `switchboard serve` (raw TCP and WebSocket on loopback)
and nginx on tuning/nginx-tls.conf (the documented file; only ports, paths,
certificate and limits rewritten for this host), then for each front
(raw protocol over TLS through nginx's stream module, and wss:// through
its HTTP proxy) opens N clients that each complete a full TLS handshake
and log in, holds them idle, and has the application broadcast to them:

- nginx memory per idle connection: growth of the summed RSS and PSS of
  nginx's processes (master and workers) from before the N connections to
  after, divided by N (Switchboard's own growth beside it);
- nginx CPU per connection set up: the CPU time nginx's processes spent
  (/proc/PID/schedstat, ns) while the N clients connected, handshook and
  logged in, divided by N; user and system time from /proc/PID/stat;
- nginx CPU per message delivered: the same during B broadcasts of a
  64-byte message to all N clients, one at a time (each once the previous
  has reached every client), divided by the deliveries;
- Switchboard's CPU for the same set-ups and deliveries, side by side (its
  memory growth too, though in the second run it reuses what the first
  freed);
- what nginx holds at start, idle, with `worker_connections` as documented
  (65536) and with 1024 (its connection table is allocated at start).

The clients are this script's asyncio tasks, on the same cores (their CPU
is not counted). Usage:

  scripts/tls-front-cost.py [--connections N] [--broadcasts B] [--key ec|rsa] [--no-build]

Needs nginx and libnginx-mod-stream (apt-get install --no-install-recommends
nginx libnginx-mod-stream openssl) and the Python package websockets (13+,
for its websockets.asyncio client). The server keeps its store in a
temporary directory of its own, removed at the end.
Prints a summary and the figures as JSON on the last line.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX = "/usr/sbin/nginx"
SB = os.path.join(ROOT, "target", "release", "switchboard")
DEV_SECRET = "switchboard-dev-secret-do-not-use-in-production"
LOGIN, LOGIN_OK, PING, PONG, ROOM_MSG = 1, 2, 4, 5, 0x14
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    """pid and its children (nginx's master and workers)."""
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def memory(pids):
    """(RSS, PSS) in bytes, summed over pids."""
    rss = pss = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, v = line.split(":", 1)
                if k == "Rss":
                    rss += int(v.split()[0]) * 1024
                elif k == "Pss":
                    pss += int(v.split()[0]) * 1024
    return rss, pss


def cpu(pids):
    """(on-CPU ns of all their threads, user s, system s), summed over pids."""
    ns = user = system = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    ns += int(f.read().split()[0])
            except OSError:  # a thread that just exited
                pass
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / TICK
            system += int(fields[12]) / TICK
    return ns, user, system


def mint(user):
    import base64, hashlib, hmac
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "exp": int(time.time()) + 3600}).encode())
    sig = hmac.new(DEV_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def frame(ftype, body=b""):
    return struct.pack(">IBB", 2 + len(body), 1, ftype) + body


def nginx_conf(dir, cert, key, wss_port, tls_port, ws, raw, worker_connections, rlimit):
    text = open(os.path.join(ROOT, "tuning", "nginx-tls.conf")).read()
    documented_cert = ("ssl_certificate     /etc/ssl/switchboard/fullchain.pem;\n"
                       "        ssl_certificate_key /etc/ssl/switchboard/privkey.pem;")
    edits = [
        ("listen 443 ssl ", f"listen 127.0.0.1:{wss_port} ssl "),
        ("listen 7443 ssl ", f"listen 127.0.0.1:{tls_port} ssl "),
        ("proxy_pass http://127.0.0.1:7710;", f"proxy_pass http://{ws};"),
        ("proxy_pass 127.0.0.1:7700;", f"proxy_pass {raw};"),
        ("user www-data;", ""),
        ("worker_processes auto;", "worker_processes 2;"),
        ("worker_rlimit_nofile 140000;", f"worker_rlimit_nofile {rlimit};"),
        ("worker_connections 65536;", f"worker_connections {worker_connections};"),
        ("pid /run/nginx-switchboard.pid;", f"pid {dir}/nginx.pid;"),
        ("error_log /var/log/nginx/switchboard-error.log warn;", f"error_log {dir}/error.log warn;"),
    ]
    for a, b in edits:
        if text.count(a) != 1:
            sys.exit(f"tuning/nginx-tls.conf changed: {a!r} not found once")
        text = text.replace(a, b)
    text = text.replace(documented_cert, f"ssl_certificate     {cert};\n        ssl_certificate_key {key};")
    path = os.path.join(dir, f"nginx-{worker_connections}.conf")
    open(path, "w").write(text)
    return path


def start_nginx(dir, conf, ports):
    p = subprocess.Popen([NGINX, "-p", dir, "-c", conf, "-e", f"{dir}/error.log", "-g", "daemon off;"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if p.poll() is not None:
            sys.exit(f"nginx exited: {open(dir + '/error.log').read()}")
        if all(_connects(port) for port in ports) and len(children(p.pid)) >= 3:
            time.sleep(0.3)  # workers done initialising
            return p
        time.sleep(0.05)
    sys.exit("nginx did not start")


def _connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def stop(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


class Counter:
    def __init__(self):
        self.n = 0


async def raw_client(i, port, ctx, sem, counter, held):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
        user = f"t{i}".encode()
        tok = mint(user.decode()).encode()
        w.write(frame(LOGIN, bytes([len(user)]) + user + struct.pack(">H", len(tok)) + tok))
        head = await r.readexactly(6)
        body = await r.readexactly(struct.unpack(">I", head[:4])[0] - 2)
        if head[5] != LOGIN_OK:
            raise RuntimeError(f"login refused: {body!r}")
    held.append(w)
    while True:
        head = await r.readexactly(6)
        body = await r.readexactly(struct.unpack(">I", head[:4])[0] - 2)
        if head[5] == ROOM_MSG:
            counter.n += 1
        elif head[5] == PING:
            w.write(frame(PONG, body))


async def wss_client(i, port, ctx, sem, counter, held):
    from websockets.asyncio.client import connect
    async with sem:
        url = f"wss://127.0.0.1:{port}/?user=w{i}&token={mint(f'w{i}')}"
        ws = await connect(url, ssl=ctx, subprotocols=["switchboard.v1.json"], ping_interval=None,
                           compression=None, max_size=1 << 20)
        first = json.loads(await ws.recv())
        if first.get("type") != "login_ok":
            raise RuntimeError(f"login refused: {first}")
    held.append(ws)
    async for msg in ws:
        if '"room_msg"' in msg:
            counter.n += 1


def broadcast(admin, payload):
    # A raw payload: the admin API takes it as application/octet-stream
    # (urllib's default form type is refused with 415).
    req = urllib.request.Request(f"http://{admin}/broadcast", data=payload, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


async def measure(kind, port, ctx, n, broadcasts, nginx_pids, sb_pid, admin):
    sem = asyncio.Semaphore(256)
    counter, held = Counter(), []
    client = raw_client if kind == "raw-tls" else wss_client
    mem0, sb0 = memory(nginx_pids), memory([sb_pid])
    cpu0, sbc0 = cpu(nginx_pids), cpu([sb_pid])
    t0 = time.monotonic()
    tasks = [asyncio.create_task(client(i, port, ctx, sem, counter, held)) for i in range(n)]
    while len(held) < n:
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            raise failed[0].exception()
        await asyncio.sleep(0.05)
    setup_s = time.monotonic() - t0
    cpu1, sbc1 = cpu(nginx_pids), cpu([sb_pid])
    await asyncio.sleep(1.0)  # let allocators settle
    mem1, sb1 = memory(nginx_pids), memory([sb_pid])
    payload = b"x" * 64
    cpu2, sbc2 = cpu(nginx_pids), cpu([sb_pid])
    # One message at a time: the next goes out once every client has the
    # previous one, so no two share a read, a TLS record or a write (back
    # to back, they would, and the cost per message would fall with the
    # batching: chat traffic is mostly one at a time).
    end = time.monotonic() + 120
    for k in range(1, broadcasts + 1):
        await asyncio.to_thread(broadcast, admin, payload)
        while counter.n < k * n and time.monotonic() < end:
            await asyncio.sleep(0.002)
    cpu3, sbc3 = cpu(nginx_pids), cpu([sb_pid])
    for t in tasks:
        t.cancel()
    for h in held:
        try:
            if kind == "raw-tls":
                h.close()
            else:
                await asyncio.wait_for(h.close(), 1)
        except Exception:
            pass
    return {
        "front": kind,
        "connections": n,
        "setup_s": round(setup_s, 2),
        "nginx_rss_per_conn_bytes": round((mem1[0] - mem0[0]) / n),
        "nginx_pss_per_conn_bytes": round((mem1[1] - mem0[1]) / n),
        "switchboard_rss_per_conn_bytes": round((sb1[0] - sb0[0]) / n),
        "nginx_cpu_per_conn_us": round((cpu1[0] - cpu0[0]) / n / 1000, 1),
        "switchboard_cpu_per_conn_us": round((sbc1[0] - sbc0[0]) / n / 1000, 1),
        "nginx_user_s_setup": round(cpu1[1] - cpu0[1], 2),
        "nginx_sys_s_setup": round(cpu1[2] - cpu0[2], 2),
        "deliveries": counter.n,
        "nginx_cpu_per_delivery_us": round((cpu3[0] - cpu2[0]) / max(counter.n, 1) / 1000, 2),
        "switchboard_cpu_per_delivery_us": round((sbc3[0] - sbc2[0]) / max(counter.n, 1) / 1000, 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=4000)
    ap.add_argument("--broadcasts", type=int, default=20)
    ap.add_argument("--key", choices=["ec", "rsa"], default="ec")
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(NGINX) or not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        sys.exit("needs nginx and its stream module: apt-get install --no-install-recommends nginx libnginx-mod-stream")
    if shutil.which("openssl") is None:
        sys.exit("needs openssl (the test certificate): apt-get install --no-install-recommends openssl")
    # Said before the build and the raw-over-TLS run, not by the wss run
    # minutes later.
    try:
        import websockets.asyncio.client  # noqa: F401
    except ImportError:
        sys.exit(f"needs the Python package websockets 13 or later for {sys.executable}: "
                 f"{sys.executable} -m pip install 'websockets>=13'")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "switchboard", "--bin", "switchboard"],
                       cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory(prefix="sb-tls-cost-") as dir:
        cert, key = f"{dir}/cert.pem", f"{dir}/key.pem"
        keyopt = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if a.key == "ec"
                  else ["-newkey", "rsa:2048"])
        subprocess.run(["openssl", "req", "-x509", *keyopt, "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        raw, ws, admin = (f"127.0.0.1:{free_port()}" for _ in range(3))
        # A store of its own: the default, ./switchboard-data, would be
        # left in the caller's directory, and is locked by a server started
        # there by hand (this one then exits at start).
        open(f"{dir}/sb.toml", "w").write(
            f'[server]\nlisten = "{raw}"\nworkers = 2\n[websocket]\nlisten = "{ws}"\n[admin]\nlisten = "{admin}"\n'
            f'[store]\npath = "{dir}/store"\n')
        sb_log = open(f"{dir}/switchboard.log", "w")
        sb = subprocess.Popen([SB, "serve", "--log", "warn", "--config", f"{dir}/sb.toml"],
                              stdout=subprocess.DEVNULL, stderr=sb_log, start_new_session=True)
        try:
            # Every port: the admin port takes connections before the
            # client ports listen (it is bound with the start-up checks).
            end = time.monotonic() + 30
            while not all(_connects(int(a.rsplit(":", 1)[1])) for a in (raw, ws, admin)):
                if sb.poll() is not None or time.monotonic() > end:
                    sys.exit("switchboard did not start:\n" + open(f"{dir}/switchboard.log").read())
                time.sleep(0.05)
            results = {"key": "ECDSA P-256" if a.key == "ec" else "RSA 2048"}
            # What nginx holds at start, idle, by worker_connections.
            for wc in (65536, 1024):
                ports = (free_port(), free_port())
                conf = nginx_conf(dir, cert, key, *ports, ws, raw, wc, 20000)
                p = start_nginx(dir, conf, ports)
                results[f"nginx_idle_rss_bytes_wc{wc}"], results[f"nginx_idle_pss_bytes_wc{wc}"] = memory(children(p.pid))
                stop(p)
            ctx = ssl.create_default_context(cafile=cert)
            results["runs"] = []
            for kind in ("raw-tls", "wss"):
                ports = (free_port(), free_port())
                conf = nginx_conf(dir, cert, key, *ports, ws, raw, a.connections + 1024, 20000)
                p = start_nginx(dir, conf, ports)
                try:
                    pids = children(p.pid)
                    port = ports[1] if kind == "raw-tls" else ports[0]
                    r = asyncio.run(measure(kind, port, ctx, a.connections, a.broadcasts, pids, sb.pid, admin))
                    results["runs"].append(r)
                    print(f"{kind:8} {a.connections} connections ({results['key']}): nginx "
                          f"{r['nginx_rss_per_conn_bytes']} B RSS / {r['nginx_pss_per_conn_bytes']} B PSS per idle "
                          f"connection (Switchboard {r['switchboard_rss_per_conn_bytes']} B), "
                          f"{r['nginx_cpu_per_conn_us']} us CPU per connection set up (handshake + login; "
                          f"Switchboard {r['switchboard_cpu_per_conn_us']} us), "
                          f"{r['nginx_cpu_per_delivery_us']} us per message delivered (Switchboard "
                          f"{r['switchboard_cpu_per_delivery_us']} us; {r['deliveries']} deliveries)", file=sys.stderr)
                finally:
                    stop(p)
                time.sleep(1)
        finally:
            if sb.poll() is None:
                os.killpg(sb.pid, signal.SIGTERM)
                try:
                    sb.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(sb.pid, signal.SIGKILL)
                    sb.wait()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
