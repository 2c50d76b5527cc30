#!/usr/bin/env python3
"""Shared-cache import benchmark: `modelcache-agent pull --sources shared-cache` against `cp` of the same
files on the same disk.

huggingface_hub's `snapshot_download` fills an HF cache (the shared PVC of a "download Job")
from `modelcache-hub` with a repo of two 1 GiB safetensors files plus small files, in the work
directory, so source, `cp`'s destination and modelcache's store share one disk. Then each client
copies the snapshot into a fresh directory, `--runs` times, interleaved:

  modelcache  pull --sources shared-cache into a fresh store: copy_file_range, sha256 / git sha1 of every
              byte copied, fsync of every blob, the snapshot
  cp          cp -rL of the snapshot (following its symlinks to the blobs)
  cp + sync   the same, then sync: on disk, as modelcache's blobs are when it returns

in two regimes: source in the page cache (warm), and every cache dropped before each run (cold,
as a node meets a PVC it has not read). Prints a Markdown table with ratios and peak RSS, and
writes a JSON and an SVG chart. Run through hack/bench-import.sh. Needs root (drop_caches).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_pull import GIB, REPO, Hub, make_repo, report, timed

FILL = r"""
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1]))
"""


def fill_shared_cache(agent, hub_root, home, log):
    """HF_HOME=home snapshot_download(REPO) from modelcache-hub; the snapshot directory."""
    if os.path.isdir(home):
        shutil.rmtree(home)
    hub = Hub(agent, hub_root, [], log)
    try:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=home,
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        env.pop("HF_TOKEN", None)
        out = subprocess.run([sys.executable, "-c", FILL, REPO], env=env, check=True,
                             capture_output=True, text=True).stdout
    finally:
        hub.stop()
    return out.strip().splitlines()[-1]


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--agent", default="target/release/modelcache-agent")
    p.add_argument("--workdir",
                   default=os.path.join(tempfile.gettempdir(), "modelcache-bench-import"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--big-files", type=int, default=2)
    p.add_argument("--big-gib", type=float, default=1.0)
    p.add_argument("--json", default="docs/bench/pvc-import.json")
    p.add_argument("--svg", default="docs/bench/pvc-import.svg")
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("the cold regime drops the page cache and needs root: sudo hack/bench-import.sh")

    os.makedirs(a.workdir, exist_ok=True)
    hub_root = os.path.join(a.workdir, "hub")
    print(f"generating the repo in {hub_root} …", flush=True)
    make_repo(hub_root, a.big_files, int(a.big_gib * GIB))
    home = os.path.join(a.workdir, "pvc")
    with open(os.path.join(a.workdir, "hub.log"), "w") as log:
        snapshot = fill_shared_cache(a.agent, hub_root, home, log)
    total = sum(os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(snapshot) for f in files)
    print(f"shared cache: {snapshot} ({total / GIB:.2f} GiB)", flush=True)

    out = os.path.join(a.workdir, "out")
    clients = {
        "modelcache": [a.agent, "pull", REPO, "--store", out, "--shared-cache", home,
                       "--sources", "shared-cache"],
        "cp": ["cp", "-rL", snapshot, out],
        "cp + sync": ["bash", "-c", f'cp -rL "{snapshot}" "{out}" && sync'],
    }
    results = {}
    for regime, cold in [("warm source", False), ("cold source", True)]:
        samples = {c: ([], []) for c in clients}
        # One uncounted round first: the first copies after the files are written are slower
        # for every client (writeback of the fill, fresh allocation).
        names = list(clients)
        for run in range(-1, a.runs):
            # The order rotates, so no client always follows the same one: deleting a copy that
            # reached the disk costs the next run (this disk is mounted with online discard),
            # deleting one that did not (cp without sync) costs nothing.
            for client in names[run % len(names):] + names[:run % len(names)]:
                argv = clients[client]
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                time.sleep(1)
                if cold:
                    drop_caches()
                else:
                    subprocess.run(["sync"], check=True)
                    subprocess.run(["cat", *(os.path.join(snapshot, f) for f in os.listdir(snapshot)
                                             if os.path.isfile(os.path.join(snapshot, f)))],
                                   stdout=subprocess.DEVNULL, check=True)
                t, rss = timed(argv)
                if run < 0:
                    continue
                samples[client][0].append(t)
                samples[client][1].append(rss)
                print(f"  {regime:>11} {client:>10} run {run + 1}: {t:6.2f} s, "
                      f"{total / t / 1e6:6.0f} MB/s, {rss:5.0f} MiB RSS", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        results[regime] = {c: {"seconds": statistics.median(ts), "runs": ts,
                               "rss_mib": max(rs), "bytes": total}
                           for c, (ts, rs) in samples.items()}
    report(results, a.json, a.svg, "Import from a shared HF cache, 2 GiB + small files")


if __name__ == "__main__":
    main()
