"""bench/cutover: what a switch costs the requests in flight, and what the proxy costs.

1. Blue-green: wrk keeps steady load on the proxy's address while the notes example goes
   1.0.0 -> 2.0.0 -> 1.0.0 ten times (`upshift upgrade`, then `upshift rollback`). Failed
   requests (non-2xx answers and socket errors) and p99 over the whole switching run,
   against the p99 of the same load with no switch.
2. The same with `recreate` (stop old, start new on the same address): the contrast.
3. Throughput of upshift's proxy against nginx `proxy_pass` (keep-alive upstream) to the
   same notes backend, and the backend alone, on `/slow?ms=0` (no database work).

Both releases run on the same schema (1.0.0's table plus 2.0.0's expand migration), so each
switch is code only: what is measured is the cutover, not a migration.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_wrk(text):
    """Requests, failures, requests/s and latency percentiles (ms) from wrk --latency."""
    out = {"requests": 0, "failed": 0, "rps": 0.0}
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        out[f"p{pct}"] = float(value) * UNITS[unit]
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["failed"] += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["failed"] += int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    return out


def wrk_args(url, seconds, connections):
    return ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s", url]


def wrk(url, seconds, connections=16):
    done = subprocess.run(wrk_args(url, seconds, connections), capture_output=True, text=True, check=True)
    return parse_wrk(done.stdout)


class Deployment:
    """A folder written by `upshift demo --prepare-only`, its strategy set."""

    def __init__(self, upshift, root, strategy):
        self.upshift = upshift
        self.dir = os.path.join(root, strategy)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        subprocess.run([upshift, "demo", "--prepare-only", "--dir", self.dir, "--port", str(self.port)],
                       check=True, capture_output=True)
        path = os.path.join(self.dir, "upshift.toml")
        with open(path) as f:
            text = f.read()
        # Both releases on the same schema: every switch is code only.
        text = text.replace('migrate_to = "20260101000000"', 'migrate_to = "20260201000000"')
        text = text.replace('migrate_to = "20260202000000"', 'migrate_to = "20260201000000"', 1)
        text = re.sub(r'strategy = "blue-green".*', f'strategy = "{strategy}"', text)
        with open(path, "w") as f:
            f.write(text)

    def run(self, *args):
        done = subprocess.run([self.upshift, *args], cwd=self.dir, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"upshift {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def status(self):
        return json.loads(self.run("status", "--output", "json"))

    def stop(self):
        subprocess.run([self.upshift, "agent", "stop"], cwd=self.dir, capture_output=True)


def switching(deployment, rounds, connections):
    """wrk on the proxy while the release goes to 2.0.0 and back `rounds` times."""
    load = subprocess.Popen(wrk_args(deployment.url + "/api/notes", 3600, connections),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    started = time.monotonic()
    for _ in range(rounds):
        deployment.run("upgrade", "--to", "2.0.0")
        deployment.run("rollback")
    elapsed = time.monotonic() - started
    time.sleep(1)
    load.send_signal(signal.SIGINT)
    out, _ = load.communicate()
    result = parse_wrk(out)
    result["seconds"] = elapsed
    return result


def nginx_conf(root, listen, backend):
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes auto;
error_log {root}/nginx-error.log;
pid {root}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream notes {{ server {backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://notes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
""")
    return conf


def ms(value):
    return f"{value:.1f} ms" if value is not None else "-"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upshift", required=True)
    parser.add_argument("--nginx", required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--throughput-only", action="store_true", help="skip the switches")
    args = parser.parse_args()
    upshift = os.path.abspath(args.upshift)
    root = tempfile.mkdtemp(prefix="upshift-bench-cutover.")
    deployments = []
    nginx = None
    try:
        rows = []
        for strategy in ["blue-green"] if args.throughput_only else ["blue-green", "recreate"]:
            d = Deployment(upshift, root, strategy)
            deployments.append(d)
            d.run("upgrade", "--to", "1.0.0")
            if not args.throughput_only:
                print(f"{strategy}: steady load {args.seconds}s", file=sys.stderr)
                steady = wrk(d.url + "/api/notes", args.seconds, args.connections)
                print(f"{strategy}: {args.rounds} x 1.0.0 -> 2.0.0 -> 1.0.0 under load", file=sys.stderr)
                switched = switching(d, args.rounds, args.connections)
                rows.append((strategy, steady, switched))
            if strategy == "blue-green":
                serving = [i for i in d.status()["components"][0]["instances"] if i["serving"]]
                backend = serving[0]["addr"]
                proxied = d.url
            else:
                d.stop()

        print("proxy throughput: the backend alone, upshift's proxy, nginx", file=sys.stderr)
        nginx_port = free_port()
        conf = nginx_conf(root, nginx_port, backend)
        nginx = subprocess.Popen([args.nginx, "-c", conf, "-p", root, "-g", "daemon off;"],
                                 stderr=subprocess.DEVNULL)
        time.sleep(1)
        through = {}
        for name, url in [("backend alone", f"http://{backend}"), ("upshift proxy", proxied),
                          ("nginx proxy_pass", f"http://127.0.0.1:{nginx_port}")]:
            wrk(url + "/slow?ms=0", 2, args.connections)  # warm up
            through[name] = wrk(url + "/slow?ms=0", args.seconds, args.connections)

        switches = 2 * args.rounds
        if rows:
            print(f"\n## Switches under load ({switches} switches, wrk -t2 -c{args.connections} on GET /api/notes)\n")
            print("| strategy | requests | failed | p99 steady | p99 switching | ratio | time per switch |")
            print("|---|---|---|---|---|---|---|")
            for strategy, steady, switched in rows:
                ratio = switched["p99"] / steady["p99"] if steady.get("p99") else float("nan")
                print(f"| {strategy} | {switched['requests']} | {switched['failed']} | {ms(steady.get('p99'))} | "
                      f"{ms(switched.get('p99'))} | {ratio:.2f}x | {switched['seconds'] / switches:.2f} s |")
        print(f"\n## Proxy throughput (GET /slow?ms=0, wrk -t2 -c{args.connections}, {args.seconds}s each)\n")
        print("| path | requests/s | p50 | p99 | failed | vs nginx |")
        print("|---|---|---|---|---|---|")
        base = through["nginx proxy_pass"]["rps"]
        for name, r in through.items():
            print(f"| {name} | {r['rps']:.0f} | {ms(r.get('p50'))} | {ms(r.get('p99'))} | {r['failed']} | "
                  f"{r['rps'] / base:.2f}x |")
    finally:
        if nginx:
            nginx.terminate()
            nginx.wait()
        for d in deployments:
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
