"""bench/proxy: what upshift's proxy costs against nginx, measured honestly.

The notes example (release 1.0.0, deployed blue-green so it sits behind upshift's proxy) is
the backend. In front of it: upshift's proxy (the agent's) and nginx `proxy_pass` to a
keep-alive upstream (`worker_processes auto`, `access_log off`). `GET /slow?ms=0` (no
database work) with `wrk -t2 -c16 -d10s --latency` on each, interleaved (the order flips
every repetition, so a drift of the machine hits both), after a warm-up of each. The
backend alone is measured in the same rounds: the floor. Prints the median, min and max of
requests/s and p99 per path, and the ratio to nginx of the medians and per round.

Each run also reads the CPU time (user + system, from /proc) the proxy itself spent: the
agent's process for upshift, nginx's master and workers for nginx. Divided by the requests
served, it is the proxy's cost per request, which the shared cores cannot blur.

`--perf DIR` then runs one more upshift round under `perf record` (the agent's process
only) and writes the profile's top to DIR.
"""

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("cutover", os.path.join(HERE, "..", "cutover", "bench.py"))
cutover = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cutover)


def agent_pid(state_dir):
    """The agent serving `state_dir`: the one process whose command line names it."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"agent" in argv and any(state_dir.encode() in a for a in argv):
            return int(pid)
    sys.exit(f"no agent found for {state_dir}")


def cpu_seconds(pids):
    """User + system CPU time of `pids` so far, in seconds."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def children(pid):
    """`pid` and its child processes."""
    found = [pid]
    for other in os.listdir("/proc"):
        try:
            with open(f"/proc/{other}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(other))
        except (OSError, ValueError):
            continue
    return found


def measured(url, seconds, connections, pids):
    """wrk on `url`, with the CPU time `pids` spent per request (µs) while it ran."""
    before = cpu_seconds(pids) if pids else None
    result = cutover.wrk(url, seconds, connections)
    if pids and result["requests"]:
        result["cpu_us"] = (cpu_seconds(pids) - before) * 1e6 / result["requests"]
    return result


def profile(out_dir, pid, url, seconds, connections):
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, "upshift.perf.data")
    record = subprocess.Popen(["perf", "record", "-F", "999", "-o", data, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    result = cutover.wrk(url, seconds, connections)
    record.send_signal(2)
    record.wait()
    tops = []
    for sort in ["dso", "dso,symbol"]:
        done = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", sort, "--stdio",
                               "--percent-limit", "0.7"], capture_output=True, text=True)
        tops.append(done.stdout)
    path = os.path.join(out_dir, "upshift-top.txt")
    with open(path, "w") as f:
        f.write(f"# {result['rps']:.0f} req/s under perf\n")
        f.write("\n".join(tops))
    print(f"profile: {path}", file=sys.stderr)


def summary(values):
    return statistics.median(values), min(values), max(values)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upshift", required=True)
    parser.add_argument("--nginx", required=True)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--perf", metavar="DIR", help="also profile the agent with perf into DIR")
    args = parser.parse_args()
    upshift = os.path.abspath(args.upshift)
    root = tempfile.mkdtemp(prefix="upshift-bench-proxy.")
    deployment = None
    nginx = None
    try:
        deployment = cutover.Deployment(upshift, root, "blue-green")
        deployment.run("upgrade", "--to", "1.0.0")
        serving = [i for i in deployment.status()["components"][0]["instances"] if i["serving"]]
        backend = serving[0]["addr"]
        nginx_port = cutover.free_port()
        conf = cutover.nginx_conf(root, nginx_port, backend)
        nginx = subprocess.Popen([args.nginx, "-c", conf, "-p", root, "-g", "daemon off;"],
                                 stderr=subprocess.DEVNULL)
        time.sleep(1)
        paths = {"backend alone": f"http://{backend}", "upshift proxy": deployment.url,
                 "nginx proxy_pass": f"http://127.0.0.1:{nginx_port}"}
        for url in paths.values():
            cutover.wrk(url + "/slow?ms=0", 2, args.connections)  # warm up
        # Whose CPU time each path's figure counts (the backend's own is not a proxy's).
        pids = {"backend alone": None, "upshift proxy": [agent_pid(deployment.dir)],
                "nginx proxy_pass": children(nginx.pid)}
        runs = {name: [] for name in paths}
        names = list(paths)
        for rep in range(args.repetitions):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                r = measured(paths[name] + "/slow?ms=0", args.seconds, args.connections, pids[name])
                runs[name].append(r)
                cpu = f", proxy CPU {r['cpu_us']:.2f} µs/request" if "cpu_us" in r else ""
                print(f"round {rep + 1}: {name}: {r['rps']:.0f} req/s, p99 {cutover.ms(r.get('p99'))}, "
                      f"failed {r['failed']}{cpu}", file=sys.stderr)
        if args.perf:
            profile(args.perf, agent_pid(deployment.dir), deployment.url + "/slow?ms=0", args.seconds,
                    args.connections)

        print(f"\n## Proxy throughput (GET /slow?ms=0, wrk -t2 -c{args.connections} -d{args.seconds}s, "
              f"{args.repetitions} interleaved rounds)\n")
        print("| path | req/s median | min | max | p99 median | min | max | failed | vs nginx (median) "
              "| proxy CPU µs/request median (min-max) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        base = statistics.median(r["rps"] for r in runs["nginx proxy_pass"])
        for name, rs in runs.items():
            rps = summary([r["rps"] for r in rs])
            p99 = summary([r.get("p99", float("nan")) for r in rs])
            cpu = summary([r["cpu_us"] for r in rs]) if all("cpu_us" in r for r in rs) else None
            cpu = f"{cpu[0]:.2f} ({cpu[1]:.2f}-{cpu[2]:.2f})" if cpu else "-"
            print(f"| {name} | {rps[0]:.0f} | {rps[1]:.0f} | {rps[2]:.0f} | {p99[0]:.2f} ms | {p99[1]:.2f} ms | "
                  f"{p99[2]:.2f} ms | {sum(r['failed'] for r in rs)} | {rps[0] / base:.2f}x | {cpu} |")
        ratios = [u["rps"] / n["rps"] for u, n in zip(runs["upshift proxy"], runs["nginx proxy_pass"])]
        print(f"\nupshift / nginx per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    finally:
        if nginx:
            nginx.terminate()
            nginx.wait()
        if deployment:
            deployment.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
