#!/usr/bin/env python3
"""Cold pull benchmark: `modelcache-agent pull` against its peers, same hub, same run.

A synthetic repo (two 1 GiB safetensors files plus small files) is served by `modelcache-hub` twice:
unthrottled on loopback, and capped at 40 MB/s per connection (how CDNs serve). Each client
downloads the whole repo into a fresh directory on the same disk, `--runs` times; the median
wall time counts. Peers:

  huggingface_hub  snapshot_download, as users call it (8 files at once, one stream each)
  hf_transfer      hf_transfer.download per file, 100 ranges of 10 MiB in flight, 8 files at once
  curl             one plain `curl` per file, one after another

modelcache also verifies every byte (sha256 / git sha1) and makes a snapshot; no peer verifies.
Prints a Markdown table with ratios and peak RSS, and writes a JSON and an SVG chart.
Run through hack/bench-pull.sh, which builds and installs what this needs.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

GIB = 1 << 30
REPO = "bench/model"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_repo(root, big_files, big_bytes):
    repo = os.path.join(root, "models", REPO)
    os.makedirs(repo, exist_ok=True)
    chunk = 8 << 20
    for i in range(big_files):
        path = os.path.join(repo, f"model-{i + 1:05d}-of-{big_files:05d}.safetensors")
        if os.path.exists(path) and os.path.getsize(path) == big_bytes:
            continue
        with open(path, "wb") as f:
            left = big_bytes
            while left:
                n = min(chunk, left)
                f.write(os.urandom(n))
                left -= n
    small = {
        "config.json": b'{"architectures":["LlamaForCausalLM"],"hidden_size":2048}',
        "generation_config.json": b'{"do_sample":true}',
        "tokenizer_config.json": b'{"model_max_length":32768}',
        "tokenizer.json": os.urandom(3 << 20).hex().encode()[: 7 << 20],
        "README.md": b"# bench model\n" * 100,
    }
    for name, data in small.items():
        with open(os.path.join(repo, name), "wb") as f:
            f.write(data)
    return repo


class Hub:
    """modelcache-hub, the binary built beside the agent."""

    def __init__(self, agent, root, extra, log):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        hub = os.path.join(os.path.dirname(agent) or ".", "modelcache-hub")
        self.proc = subprocess.Popen(
            [hub, "--root", root, "--listen", f"127.0.0.1:{self.port}", *extra],
            stdout=log,
            stderr=log,
        )
        deadline = time.time() + 600  # the hub hashes 2 GiB first
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"modelcache-hub exited with {self.proc.returncode}; see its log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("modelcache-hub did not start")
                time.sleep(0.2)

    def files(self):
        url = f"{self.endpoint}/api/models/{REPO}/tree/main?recursive=true"
        with urllib.request.urlopen(url) as r:
            return [(e["path"], e["size"]) for e in json.load(r) if e["type"] == "file"]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()


def timed(argv, env=None):
    """Wall seconds and peak RSS (MiB) of a command. GNU time measures the RSS: a child forked
    from Python would count Python's own ~35 MiB, copied before exec, as its peak."""
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace")
            sys.exit(f"{argv[0]} failed:\n{err[-3000:]}")
        return elapsed, int(rss.read().split()[-1]) / 1024


HF_TRANSFER = r"""
import concurrent.futures, json, os, sys, hf_transfer
endpoint, repo, out = sys.argv[1:4]
files = json.loads(sys.argv[4])
def one(path):
    dest = os.path.join(out, path)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    hf_transfer.download(url=f"{endpoint}/{repo}/resolve/main/{path}", filename=dest,
                         max_files=100, chunk_size=10 * 1024 * 1024)
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(one, files))
"""

SNAPSHOT_DOWNLOAD = r"""
import sys
from huggingface_hub import snapshot_download
snapshot_download(sys.argv[2], cache_dir=sys.argv[3], max_workers=8)
"""


def clients(agent, extra_agent_args):
    def modelcache(hub, out, files):
        return [agent, "pull", REPO, "--store", out, "--endpoint", hub.endpoint,
                *extra_agent_args], None

    def huggingface_hub(hub, out, files):
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ENABLE_HF_TRANSFER="0")
        env.pop("HF_TOKEN", None)
        return [sys.executable, "-c", SNAPSHOT_DOWNLOAD, hub.endpoint, REPO, out], env

    def hf_transfer(hub, out, files):
        return [sys.executable, "-c", HF_TRANSFER, hub.endpoint, REPO, out,
                json.dumps([p for p, _ in files])], None

    def curl(hub, out, files):
        script = "set -e\n" + "".join(
            f'mkdir -p "$(dirname "{out}/{p}")"; '
            f'curl -sSfL -o "{out}/{p}" "{hub.endpoint}/{REPO}/resolve/main/{p}"\n'
            for p, _ in files
        )
        return ["bash", "-c", script], None

    return {
        "modelcache": modelcache,
        "huggingface_hub": huggingface_hub,
        "hf_transfer": hf_transfer,
        "curl": curl,
    }


def bench_regime(name, hub, work, runs, agent, agent_args, only, warmup_alone):
    """Runs every client `runs` times, interleaved (a slow moment of the machine hits all of
    them alike), after a warm-up round that is not counted: the first pulls after the hub
    starts are slower for every client (fresh disk allocation, cold caches)."""
    files = hub.files()
    total = sum(s for _, s in files)
    makers = {c: m for c, m in clients(agent, agent_args).items() if not only or c in only}
    samples = {client: ([], []) for client in makers}
    out = os.path.join(work, "out")
    for run in range(-1, runs):
        for client, make in makers.items():
            # Warm-up: every client once where that is quick, else modelcache alone.
            if run < 0 and warmup_alone and client != "modelcache":
                continue
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            subprocess.run(["sync"], check=True)
            argv, env = make(hub, out, files)
            t, r = timed(argv, env)
            shutil.rmtree(out, ignore_errors=True)
            if run < 0:
                print(f"  {name:>11} {client:>16} warm-up: {t:.2f} s", flush=True)
                continue
            samples[client][0].append(t)
            samples[client][1].append(r)
            print(f"  {name:>11} {client:>16} run {run + 1}: {t:7.2f} s, "
                  f"{total / t / 1e6:7.0f} MB/s, {r:6.0f} MiB RSS", flush=True)
    return {client: {"seconds": statistics.median(times), "runs": times,
                     "rss_mib": max(rss), "bytes": total}
            for client, (times, rss) in samples.items()}


def table(all_results):
    lines = ["| regime | client | median s | MB/s | modelcache is × faster | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for regime, res in all_results.items():
        mc = res.get("modelcache", {}).get("seconds")
        for client, r in res.items():
            ratio = "—" if client == "modelcache" or not mc else f"{r['seconds'] / mc:.2f}×"
            lines.append(f"| {regime} | {client} | {r['seconds']:.2f} | "
                         f"{r['bytes'] / r['seconds'] / 1e6:.0f} | {ratio} | {r['rss_mib']:.0f} |")
    return "\n".join(lines)


def chart(all_results, title):
    """Horizontal bars of throughput (MB/s), one group per regime."""
    colours = {"modelcache": "#2b6cb0", "huggingface_hub": "#dd6b20",
               "hf_transfer": "#38a169", "curl": "#718096", "cp": "#718096",
               "cp + sync": "#4a5568"}
    bar, gap, left, width = 18, 30, 150, 420
    top = max(r["bytes"] / r["seconds"] for res in all_results.values() for r in res.values())
    rows = sum(len(res) for res in all_results.values())
    height = 40 + rows * (bar + 4) + len(all_results) * gap
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" '
           f'height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="18" font-weight="bold">{title}, MB/s (higher is better)</text>']
    y = 40
    for regime, res in all_results.items():
        out.append(f'<text x="10" y="{y + 4}" font-weight="bold">{regime}</text>')
        y += 12
        for client, r in res.items():
            mbps = r["bytes"] / r["seconds"] / 1e6
            w = max(1, int(width * mbps * 1e6 / top))
            out.append(f'<text x="{left - 8}" y="{y + bar - 5}" text-anchor="end">{client}</text>')
            out.append(f'<rect x="{left}" y="{y}" width="{w}" height="{bar}" '
                       f'fill="{colours.get(client, "#999")}"/>')
            out.append(f'<text x="{left + w + 6}" y="{y + bar - 5}">{mbps:.0f}</text>')
            y += bar + 4
        y += gap - 12
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--agent", default="target/release/modelcache-agent")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "modelcache-bench-pull"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--throttled-runs", type=int, default=3,
                   help="runs in the capped regime (curl alone takes ~95 s a run there)")
    p.add_argument("--only", action="append", default=[],
                   help="run only this client (repeatable): modelcache, huggingface_hub, "
                        "hf_transfer, curl")
    p.add_argument("--big-files", type=int, default=2)
    p.add_argument("--big-gib", type=float, default=1.0)
    p.add_argument("--cap-bytes-per-second", type=int, default=40_000_000,
                   help="per-connection cap of the throttled regime")
    p.add_argument("--json", default="docs/bench/cold-pull.json")
    p.add_argument("--svg", default="docs/bench/cold-pull.svg")
    p.add_argument("agent_args", nargs="*", help="extra `pull` flags, after --")
    a = p.parse_args()

    os.makedirs(a.workdir, exist_ok=True)
    hub_root = os.path.join(a.workdir, "hub")
    print(f"generating the repo in {hub_root} …", flush=True)
    make_repo(hub_root, a.big_files, int(a.big_gib * GIB))
    log = open(os.path.join(a.workdir, "hub.log"), "w")
    regimes = {
        "loopback": ([], a.runs, False),
        f"{a.cap_bytes_per_second // 1_000_000} MB/s/conn": (
            ["--max-bytes-per-second", str(a.cap_bytes_per_second)], a.throttled_runs, True),
    }
    all_results = {}
    for regime, (extra, runs, warmup_alone) in regimes.items():
        hub = Hub(a.agent, hub_root, extra, log)
        try:
            all_results[regime] = bench_regime(regime, hub, a.workdir, runs, a.agent,
                                               a.agent_args, a.only, warmup_alone)
        finally:
            hub.stop()
    report(all_results, a.json, a.svg, "Cold pull of 2 GiB + small files")


def report(results, json_path, svg_path, title):
    """Prints the table and writes the figures as JSON and as an SVG chart."""
    print()
    print(table(results))
    for path, text in [(json_path, json.dumps(results, indent=2) + "\n"),
                       (svg_path, chart(results, title))]:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
