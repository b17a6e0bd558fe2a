"""Load test of the feature service: N concurrent clients for T seconds (bounded) against
feature-server processes it starts on loopback (or an address you give).

    python benchmarks/load_test.py --clients 8 --seconds 20 --replicas 2 [--size 224]
    python benchmarks/load_test.py --clients 8 --seconds 20 --workers 2
    python benchmarks/load_test.py --address 127.0.0.1:50051 --clients 4 --seconds 10

Each client sends one image per Extract call (real photos from ../shared/data), so a call's
time is one image's latency through the whole service (queue wait, decode, micro-batch,
inference, reply). Prints throughput, p50/p99 latency per image, errors by status code and the
peak RSS of every server process.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "protos"), str(ROOT)]

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from dff_protos.v1 import common_pb2, features_pb2, features_pb2_grpc  # noqa: E402

from feature_server.convert import options_to_proto  # noqa: E402
from feature_server.extractor import ExtractOptions  # noqa: E402


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a child Python process of the benchmarks: the
    repo's packages first on PYTHONPATH, what was there kept after them (on the device machine
    the carried onnxruntime-gpu and grpcio/protobuf wheels live there)."""
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "protos"), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(
            os.pathsep) if p])
    return env


def start_replica(args: argparse.Namespace, env: dict[str, str] | None = None,
                  extra: list[str] | None = None, workers: int = 1
                  ) -> tuple[subprocess.Popen, str]:
    """`dff serve features` on a free loopback port; with ``workers`` > 1 a group of that many
    processes (``proc.worker_pids`` lists them), returned once every one listens."""
    env = child_env(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "-v", "serve", "features", "--host",
         "127.0.0.1", "--port", "0", "--no-build", "--max-batch-size", str(args.batch),
         "--workers", str(workers), *(extra or [])],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    ready = (r"feature server listening on 127\.0\.0\.1:(\d+)" if workers == 1 else
             r"listening on 127\.0\.0\.1:(\d+) \(\d+ worker processes, pids \[([\d, ]+)\]")
    for line in proc.stderr:
        m = re.search(ready, line)
        if m:
            # the rest of the log is read (and dropped) so the server never blocks on it; its
            # batchers' totals at exit ("stopped (B batches, I items, ...)") are kept
            stopped: list[str] = []
            proc.stopped_lines = stopped  # type: ignore[attr-defined]

            def drain(stream=proc.stderr, keep=stopped) -> None:
                for line in stream:
                    if "stopped (" in line:
                        keep.append(line)

            proc.drain = threading.Thread(target=drain, daemon=True)  # type: ignore[attr-defined]
            proc.drain.start()  # type: ignore[attr-defined]
            proc.worker_pids = ([int(p) for p in m.group(2).split(",")]  # type: ignore[attr-defined]
                                if workers > 1 else [proc.pid])
            return proc, f"127.0.0.1:{m.group(1)}"
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the feature server did not start")


def mean_batch(proc: subprocess.Popen) -> float | None:
    """Items per network batch over a stopped server's run (all its worker processes), from
    the totals each batcher logs at exit; None when none were logged."""
    proc.drain.join(timeout=10)  # type: ignore[attr-defined]
    batches = items = 0
    for line in proc.stopped_lines:  # type: ignore[attr-defined]
        m = re.search(r"stopped \((\d+) batches, (\d+) items", line)
        if m:
            batches, items = batches + int(m.group(1)), items + int(m.group(2))
    return items / batches if batches else None


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--workers", type=int, default=1,
                   help="server processes per replica (dff serve features --workers)")
    p.add_argument("--address", default="", help="use running server(s) ADDR[,ADDR...]")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8, help="server max batch size")
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet_sample"))
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        p.error("--clients 1..256 and --seconds up to 600")
    photos = [f.read_bytes() for f in sorted(Path(args.images).glob("*.JPEG"))[:32]]
    if not photos:
        p.error(f"no *.JPEG under {args.images}")
    procs: list[subprocess.Popen] = []
    if args.address:
        addresses = [a for a in args.address.split(",") if a]
    else:
        started = [start_replica(args, workers=args.workers) for _ in range(args.replicas)]
        procs = [s[0] for s in started]
        addresses = [s[1] for s in started]
    # every process that serves: the workers of a group (their parent only watches)
    servers = [pid for pr in procs for pid in getattr(pr, "worker_pids", [pr.pid])]
    options = options_to_proto(ExtractOptions(size=args.size))
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    peak = {pid: rss(pid) for pid in servers}
    end = time.monotonic() + args.seconds
    stop = threading.Event()

    def client(n: int) -> None:
        # each client its own connection (gRPC would otherwise share one between channels of a
        # process), as independent clients have, and as a worker group needs to be reached
        channel = grpc.insecure_channel(addresses[n % len(addresses)],
                                        options=[("grpc.use_local_subchannel_pool", 1)])
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        i = n
        while time.monotonic() < end:
            data = photos[i % len(photos)]
            i += args.clients
            reqs = [features_pb2.ExtractRequest(options=options),
                    features_pb2.ExtractRequest(image=common_pb2.ImageInput(id="x", data=data))]
            t0 = time.monotonic()
            try:
                [resp] = list(stub.Extract(iter(reqs), timeout=max(5.0, end - t0 + 30)))
                code = "OK" if not resp.HasField("error") else \
                    f"item:{common_pb2.ItemError.Code.Name(resp.error.code)}"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                codes[code] += 1
                if code == "OK":
                    latencies.append(time.monotonic() - t0)
        channel.close()

    def watch() -> None:
        while not stop.wait(0.1):
            for pid in servers:
                peak[pid] = max(peak[pid], rss(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t_start = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    stop.set()
    watcher.join()
    for pr in procs:
        pr.terminate()
        pr.wait(30)
    lat = np.asarray(latencies) * 1000
    print(f"servers: {len(addresses)} ({', '.join(addresses)}; {args.workers} process(es) "
          f"each), clients {args.clients}, "
          f"{args.seconds:g}s, size {args.size}, server max batch {args.batch}")
    print(f"throughput: {len(latencies) / wall:.2f} images/s ({len(latencies)} ok in "
          f"{wall:.1f}s)")
    if len(lat):
        print(f"latency per image: p50 {np.percentile(lat, 50):.0f} ms, p99 "
              f"{np.percentile(lat, 99):.0f} ms, max {lat.max():.0f} ms")
    print("results by code: " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())))
    for pid, b in peak.items():
        print(f"peak RSS of server pid {pid}: {b / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
