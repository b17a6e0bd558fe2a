"""Feature-server throughput: loopback gRPC vs the same ONNX Runtime session in-process.

Same images, same batch size, same Extractor (one ORT session): the server is started in this
process on 127.0.0.1:0 around that Extractor, so the difference is gRPC + serialisation +
micro-batching. Prints a table (images/s, bytes per image on the wire) and overhead ratios.
Every precision (fp32, int8, fp16 variants of VGG-19) gets its rows: the network alone on
preprocessed batches (for each ``--batch-sizes``, to tune the batch on a GPU; on CUDA also with
the batch already on the device), in-process with decoding, and through the gRPC server (with
``--server-process`` also a server in its own process), with the ratio to fp32 of the same run.

    .venv/bin/python benchmarks/bench_features.py [--images 32] [--batch-size 8] [--repeat 2]
        [--precisions fp32,int8,fp16] [--batch-sizes 8,32] [--server-process] [--data DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from dff_protos.v1 import features_pb2, features_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sysinfo import cpu_description  # noqa: E402
from feature_server.convert import (  # noqa: E402
    PreparedInputs,
    image_request,
    options_to_proto,
    result_to_proto,
)
from feature_server.extractor import ExtractOptions, Extractor  # noqa: E402
from feature_server.images import decode_pixels  # noqa: E402
from feature_server.service import ServerConfig, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "imagenet_sample"


def in_process(extractor: Extractor, items: list[tuple[str, bytes]], options: ExtractOptions
               ) -> float:
    """Seconds for decode + preprocess + ORT + fp16 rounding, batches of extractor.batch_size."""
    t0 = time.perf_counter()
    results = list(extractor.extract(items, options))
    elapsed = time.perf_counter() - t0
    assert all(r.error is None for r in results)
    return elapsed


def ort_only(extractor: Extractor, xs: list[np.ndarray], options: ExtractOptions,
             batch_size: int = 0, *, pageable: bool = False) -> float:
    """Seconds for ORT alone on preprocessed batches (no decoding): the compute floor, with the
    host copies. The batches are stacked as the server stacks them (in pinned memory where the
    extractor has a pool); ``pageable`` runs them from, and into, ordinary memory instead."""
    batch_size = batch_size or extractor.batch_size
    layers = list(options.layers)
    pool = extractor.pinned
    if pageable:
        extractor.pinned = None
    try:
        batches = [extractor.stack(options.model, layers, xs[s:s + batch_size])
                   for s in range(0, len(xs), batch_size)]
        t0 = time.perf_counter()
        for batch in batches:
            extractor.run(options.model, batch, layers)
        return time.perf_counter() - t0
    finally:
        extractor.pinned = pool


def on_device(extractor: Extractor, xs: list[np.ndarray], options: ExtractOptions,
              batch_size: int) -> float:
    """Seconds for the network alone with its input already on the GPU and its output left
    there (CUDA provider only): what the device does, without host copies or decoding."""
    import onnxruntime as ort

    spec = extractor.registry[options.model]
    session = extractor._session(options.model, options.layers)
    dtype = extractor.input_dtype(options.model, options.layers)  # float16: half IO
    batches = [ort.OrtValue.ortvalue_from_numpy(np.stack(xs[s:s + batch_size]).astype(dtype),
                                                "cuda", 0)
               for s in range(0, len(xs), batch_size)]

    def run(value) -> None:
        binding = session.io_binding()
        binding.bind_ortvalue_input(spec.input_name, value)
        for name in options.layers:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)

    run(batches[0])  # shape warm-up
    t0 = time.perf_counter()
    for value in batches:
        run(value)
    return time.perf_counter() - t0


def over_grpc(address: str, items: list[tuple[str, bytes]], options: ExtractOptions,
              streams: int, connections: int = 1) -> tuple[float, int, int]:
    """Seconds, request bytes and response bytes for ``streams`` concurrent Extract streams
    over ``connections`` TCP connections (several reach several worker processes)."""
    import threading

    shards = [items[k::streams] for k in range(streams)]
    sizes = [[0, 0] for _ in range(streams)]

    def run(k: int, stub: features_pb2_grpc.FeatureServiceStub) -> None:
        reqs = [features_pb2.ExtractRequest(options=options_to_proto(options))]
        reqs += [image_request(i, d) for i, d in shards[k]]  # files, or decoded pixels
        sizes[k][0] = sum(r.ByteSize() for r in reqs)
        for resp in stub.Extract(iter(reqs), timeout=600):
            assert not resp.HasField("error"), resp.error
            sizes[k][1] += resp.ByteSize()

    limit = 64 * 1024 * 1024
    options_ = [("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit)]
    if connections > 1:
        options_.append(("grpc.use_local_subchannel_pool", 1))  # one connection per channel
    channels = [grpc.insecure_channel(address, options=options_) for _ in range(connections)]
    try:
        stubs = [features_pb2_grpc.FeatureServiceStub(c) for c in channels]
        for c in channels:
            grpc.channel_ready_future(c).result(timeout=10)
        threads = [threading.Thread(target=run, args=(k, stubs[k % connections]))
                   for k in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        for c in channels:
            c.close()
    return elapsed, sum(s[0] for s in sizes), sum(s[1] for s in sizes)


class NullCompute:
    """The Extractor with ``run`` replaced by a copy of one real answer per batch: what is left
    is decoding, preprocessing, batching, serialisation and the wire. The network runs once per
    (model, outputs, input shape), on the first image that has it; every image then gets that
    image's activations (real sparsity, so sparse answers cost what they cost)."""

    def __init__(self, extractor: Extractor) -> None:
        self._inner = extractor
        self._answers: dict[tuple, list[np.ndarray]] = {}

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def run(self, model: str, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        key = (model, tuple(outputs), batch.shape[1:])
        if key not in self._answers:
            self._answers[key] = self._inner.run(model, batch[:1], outputs)
        return [np.repeat(a, batch.shape[0], axis=0) for a in self._answers[key]]

    def extract(self, items, options):
        return Extractor.extract(self, items, options)  # type: ignore[arg-type]

    def _extract_chunk(self, chunk, options):
        return Extractor._extract_chunk(self, chunk, options)  # type: ignore[arg-type]

    def _run_chunk(self, chunk, prepared, options):
        return Extractor._run_chunk(self, chunk, prepared, options)  # type: ignore[arg-type]


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_cpu_s() -> float:
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def served(args: argparse.Namespace, items: list[tuple[str, bytes]], precisions: list[str],
           pixels: list[tuple[str, np.ndarray]] | None = None, pixel_precision: str = ""
           ) -> dict[str, tuple[float, float | None, float]]:
    """Per precision, through `dff serve features` started in its own process: img/s, and the
    CPU milliseconds per image of the server process and of this (client) process. Where the
    served throughput stops scaling with cores, these say which side is the serial part (a
    side near 1000 / img/s ms per image runs on one core). With ``pixels`` (the items decoded
    here), ``pixel_precision`` (default: the first) again with them: key '<precision>
    pixels'."""
    from benchmarks.load_test import start_replica

    env = os.environ.copy()
    if args.home:
        env["DFF_HOME"] = args.home
    proc, address = start_replica(argparse.Namespace(batch=args.batch_size), env=env,
                                  extra=["--max-inflight-per-stream", str(4 * args.batch_size),
                                         "--max-wait-ms", "5"])
    try:
        out = {}
        runs_of = [(prec, items) for prec in precisions]
        if pixels:
            runs_of.append((f"{pixel_precision or precisions[0]} pixels", pixels))
        # the engine's request: activations as sparse rows (lossless, 10x fewer bytes)
        runs_of.append((f"{pixel_precision or precisions[0]} sparse", items))
        for name, payload in runs_of:
            opts = ExtractOptions(layers=(args.layer,), precision=name.split()[0],
                                  sparse=name.endswith("sparse"))
            out[name] = _measure(address, proc.pid, payload, opts, args)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _measure(address: str, pid: int, payload: list, options: ExtractOptions,
             args: argparse.Namespace) -> tuple[float, float | None, float]:
    """img/s (median of the repeats) and CPU ms per image of process ``pid`` and of this one."""
    over_grpc(address, payload[:2 * args.batch_size], options, args.streams)  # warm-up
    server0, client0 = _process_cpu_s(pid), _own_cpu_s()
    runs = [over_grpc(address, payload, options, args.streams)[0] for _ in range(args.repeat)]
    server1, client1 = _process_cpu_s(pid), _own_cpu_s()
    count = len(payload) * args.repeat
    server_ms = None if server0 is None or server1 is None else 1e3 * (server1 - server0) / count
    return len(payload) / statistics.median(runs), server_ms, 1e3 * (client1 - client0) / count


def served_null(args: argparse.Namespace, items: list[tuple[str, bytes]],
                pixels: list[tuple[str, np.ndarray]], prepared: list[tuple[str, Any]]
                ) -> dict[str, tuple[float, float | None, float]]:
    """The serving path without the network, in its own process (``--serve-null``), fed files,
    then the same photos as decoded pixels and as network inputs made here: img/s and CPU ms
    per image of the server and of this client, for each. What the server's CPU costs per
    image is what caps a GPU server's throughput (cores / that cost)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-null",
           "--batch-size", str(args.batch_size), "--providers", args.providers or ""]
    if args.home:
        cmd += ["--home", args.home]
    from benchmarks.load_test import child_env

    env = child_env()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout is not None
        address = f"127.0.0.1:{int(proc.stdout.readline())}"
        options = ExtractOptions(layers=(args.layer,))
        return {name: _measure(address, proc.pid, payload, options, args)
                for name, payload in (("files", items), ("pixels", pixels),
                                      ("prepared", prepared))}
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _start_profile(pid: int, name: str) -> Any:
    """With ``DFF_BENCH_PROFILE=PREFIX`` and py-spy on the PATH: py-spy records ``pid`` (one
    server worker) into PREFIX-<name>.txt (raw stacks, active threads) until stopped; else
    None."""
    import shutil
    import subprocess

    prefix = os.environ.get("DFF_BENCH_PROFILE")
    exe = shutil.which("py-spy")
    if not prefix or exe is None:
        return None
    spy = subprocess.Popen([exe, "record", "-p", str(pid), "-o", f"{prefix}-{name}.txt",
                            "-f", "raw", "-r", "200", "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the clients start
    return spy


def scale_out(args: argparse.Namespace, precision: str, sparse: bool = False,
              half: bool = False) -> tuple[float, float | None, int, float | None]:
    """The served path as deployed for throughput: ``--server-workers`` server processes on one
    port, ``--client-procs`` client processes each sending every photo as prepared network
    inputs (decoded and preprocessed by the client, so the server does neither) over
    ``--streams`` streams on as many connections, all started together; ``sparse`` asks for
    activations as sparse rows (what the concept engine asks for), ``half`` sends the inputs
    as float16 (half the bytes). Returns img/s over the whole run, the server group's CPU ms per
    image, the images sent and the mean network batch (warm-up included)."""
    import json
    import subprocess

    from benchmarks.load_test import child_env, mean_batch, start_replica

    env = os.environ.copy()
    if args.home:
        env["DFF_HOME"] = args.home
    server, address = start_replica(
        argparse.Namespace(batch=args.batch_size), env=env, workers=args.server_workers,
        extra=["--max-inflight-per-stream", str(4 * args.batch_size), "--max-wait-ms", "5",
               "--max-concurrent-streams", str(max(16, args.client_procs * args.streams))])
    pids = server.worker_pids  # type: ignore[attr-defined]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client-run", address,
           "--precision", precision, "--images", str(args.images), "--data", str(args.data),
           "--streams", str(args.streams), "--layer", args.layer, *(["--sparse"] if sparse else []),
           *(["--half"] if half else [])]
    env = child_env(env)
    clients = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env) for _ in range(args.client_procs)]
    try:
        for c in clients:  # each has its pixels and requests ready, and has warmed up
            assert c.stdout is not None
            if c.stdout.readline().strip() != "ready":
                raise SystemExit("a benchmark client did not start")
        spy = _start_profile(pids[0], f"{'sparse' if sparse else 'dense'}{'-f16' if half else ''}"
                                      f"-w{args.server_workers}")
        cpu0 = [_process_cpu_s(p) for p in pids]
        t0 = time.perf_counter()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        sent = sum(json.loads(c.stdout.readline())["images"] for c in clients
                   if c.stdout is not None)
        wall = time.perf_counter() - t0
        cpu1 = [_process_cpu_s(p) for p in pids]
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    finally:
        for c in clients:
            c.kill()
            c.wait(timeout=30)
        server.terminate()
        server.wait(timeout=60)
    server_ms = (None if None in cpu0 or None in cpu1 else
                 1e3 * sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / sent)  # type: ignore[operator]
    return sent / wall, server_ms, sent, mean_batch(server)


def scale_out_only(args: argparse.Namespace) -> int:
    """``--scale-out-only 4,8,12``: the scale-out rows alone, for each server group size, dense
    and sparse answers; a table and (``--json``) the rows."""
    import json

    precision = (args.precisions.split(",")[0] if args.precisions else "fp32")
    rows = []
    print(f"{cpu_description()}\n{args.client_procs} client processes x {args.streams} streams "
          f"or more (3 connections per server process), {args.images} images each, "
          f"{precision}, batch {args.batch_size}")
    base_streams = args.streams
    for workers in (int(w) for w in args.scale_out_only.split(",") if w):
        args.server_workers = workers
        # SO_REUSEPORT hashes connections onto the workers: with c connections per worker a
        # worker gets none with probability ~e^-c, so open at least 3 per worker (5%)
        args.streams = max(base_streams, -(-3 * workers // max(1, args.client_procs)))
        # float16 inputs where they are exact (fp16 on CUDA) or ~0.03% off (fp32), not int8
        wanted = {v.strip() for v in args.scale_out_variants.split(",") if v.strip()}
        variants = [(sparse, half) for sparse, half, v in (
            (False, False, "dense"), (True, False, "sparse"), (True, True, "f16-sparse"))
            if v in wanted and not (half and precision == "int8")]
        for sparse, half in variants:
            ips, server_ms, sent, batch = scale_out(args, precision, sparse, half)
            name = (f"scale-out {precision} prep{' f16' if half else ''}"
                    f"{' sparse' if sparse else ''} w{workers} c{args.client_procs}x{args.streams}"
                    f"{' ' + args.label if args.label else ''}")
            rows.append({"path": name, "img_s": ips, "server_ms": server_ms, "images": sent,
                         "mean_batch": batch})
            cpu = "n/a" if server_ms is None else f"{server_ms:.2f} ms"
            mean = "" if batch is None else f", mean batch {batch:.1f}"
            print(f"{name:<40}{ips:>9.1f} img/s  server CPU per image {cpu}{mean}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"scale_out": rows}, indent=1))
    return 0


def client_run(args: argparse.Namespace) -> int:
    """``--client-run ADDRESS``: one scale-out client (see :func:`scale_out`)."""
    import json

    files = sorted(p for p in args.data.iterdir()
                   if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    files = (files * (args.images // len(files) + 1))[:args.images]
    opts = ExtractOptions(layers=(args.layer,), precision=args.precision, sparse=args.sparse)
    # the network inputs made here, with the server's preprocessing code and the model's
    # preprocessing (from the registry: no sessions are created in the clients)
    from feature_server.images import decode_image, preprocess
    from feature_server.models.registry import load_registry

    pre = load_registry(args.home)[opts.model].preprocessing
    payload = []
    for i, p in enumerate(files):
        img = decode_image(p.read_bytes())
        x = preprocess(img, pre, opts.resize_mode, opts.size)
        payload.append((f"{i}", PreparedInputs(x.astype(np.float16) if args.half else x,
                                               None, (img.shape[0], img.shape[1]))))
    over_grpc(args.client_run, payload[:2 * args.streams], opts, args.streams, args.streams)
    print("ready", flush=True)
    sys.stdin.readline()
    over_grpc(args.client_run, payload, opts, args.streams, args.streams)
    print(json.dumps({"images": len(payload)}), flush=True)
    return 0


def serve_null(args: argparse.Namespace) -> int:
    """``--serve-null``: a feature server over :class:`NullCompute` on a free loopback port,
    printed on stdout; it serves until stdin closes."""
    extractor = Extractor.from_cache(args.home, batch_size=args.batch_size,
                                     providers=[p for p in args.providers.split(",") if p]
                                     or None)
    server = start_server(ServerConfig(host="127.0.0.1", port=0,
                                       max_batch_size=args.batch_size, max_wait_ms=5,
                                       max_inflight_per_stream=4 * args.batch_size),
                          NullCompute(extractor))  # type: ignore[arg-type]
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop(grace=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="runs per row (median kept)")
    parser.add_argument("--streams", type=int, default=1, help="concurrent gRPC streams")
    parser.add_argument("--layer", default="conv5_4")
    parser.add_argument("--home", default=None)
    parser.add_argument("--precisions", default="",
                        help="comma-separated (default: every built variant, fp32 first)")
    parser.add_argument("--batch-sizes", default="",
                        help="extra batch sizes for the network-only rows (GPU tuning)")
    parser.add_argument("--no-grpc", action="store_true", help="in-process rows only")
    parser.add_argument("--providers", default="", help="ONNX Runtime providers (default: auto)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--server-process", action="store_true",
                        help="also time the gRPC rows against `dff serve features` in its own "
                             "process (as deployed: the server does not share this process's "
                             "GIL with the clients)")
    parser.add_argument("--serve-null", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client-run", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sparse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--half", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server-workers", type=int, default=0,
                        help="with --server-process: also a scale-out row, this many server "
                             "processes (dff serve features --workers) fed prepared inputs by "
                             "--client-procs client processes")
    parser.add_argument("--scale-out-only", metavar="WORKERS",
                        help="only scale-out rows, one per server group size (comma-separated, "
                             "e.g. 4,8,12), dense, sparse and (not for int8) sparse with "
                             "float16 inputs, at the first of --precisions")
    parser.add_argument("--scale-out-variants", default="dense,sparse,f16-sparse",
                        help="with --scale-out-only: which of dense, sparse, f16-sparse "
                             "(float16 prepared inputs, sparse answers; not for int8)")
    parser.add_argument("--label", default="",
                        help="appended to the scale-out rows' names (e.g. the environment "
                             "the servers ran with)")
    parser.add_argument("--client-procs", type=int, default=2,
                        help="client processes of the scale-out row (each sends every photo)")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="folder of photos (default: ../shared/data/imagenet_sample)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.serve_null:
        return serve_null(args)
    if args.client_run:
        return client_run(args)
    if args.scale_out_only:
        return scale_out_only(args)

    files = sorted(p for p in args.data.iterdir()
                   if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        parser.error(f"no photos (.jpeg, .jpg, .png) in {args.data}")
    files = (files * (args.images // len(files) + 1))[:args.images]
    items = [(f"{i}-{p.name}", p.read_bytes()) for i, p in enumerate(files)]
    # the same photos decoded here (DecodedImage requests: the server does not decode)
    pixels = [(i, px) for i, px in ((i, decode_pixels(d)) for i, d in items) if px is not None]
    extractor = Extractor.from_cache(args.home, batch_size=args.batch_size,
                                     providers=[p for p in args.providers.split(",") if p]
                                     or None)
    server = start_server(ServerConfig(host="127.0.0.1", port=0,
                                       max_batch_size=args.batch_size, max_wait_ms=5,
                                       max_inflight_per_stream=4 * args.batch_size), extractor)
    address = f"127.0.0.1:{server.port}"
    null = NullCompute(extractor)
    null_server = start_server(ServerConfig(host="127.0.0.1", port=0,
                                            max_batch_size=args.batch_size, max_wait_ms=5,
                                            max_inflight_per_stream=4 * args.batch_size),
                               null)  # type: ignore[arg-type]
    null_address = f"127.0.0.1:{null_server.port}"
    precisions = ([p for p in args.precisions.split(",") if p] if args.precisions
                  else list(extractor.precisions))
    extra_batches = [int(b) for b in args.batch_sizes.split(",") if b]
    # half IO (the fp16 model taking and giving float16, on by default on a GPU) against the
    # same model with float32 input and outputs: the host-copy rows of both
    full_io = (Extractor.from_cache(args.home, batch_size=args.batch_size,
                                    providers=extractor.providers, precisions=["fp16"],
                                    half_io=False)
               if extractor.half_io and "fp16" in precisions else None)
    try:
        warm = ExtractOptions(layers=(args.layer,))
        list(extractor.extract(items[:args.batch_size], warm))  # warm-up
        xs = [extractor.prepare(i, d, warm).features_input for i, d in items]
        for prec in precisions:
            opts = ExtractOptions(layers=(args.layer,), precision=prec)
            for b in {args.batch_size, *extra_batches}:
                ort_only(extractor, xs[:b], opts, b)  # session + shape warm-up
        if full_io is not None:
            ort_only(full_io, xs[:args.batch_size], ExtractOptions(
                layers=(args.layer,), precision="fp16"), args.batch_size)
        if not args.no_grpc:
            over_grpc(address, items[:args.batch_size], warm, 1)
        n = len(items)
        # interleaved repeats: the machine is shared, so every row sees the same noise
        times: dict[tuple[str, str], list[float]] = {}
        wire_bytes: dict[str, tuple[int, int]] = {}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeat):
            for prec in precisions:
                opts = ExtractOptions(layers=(args.layer,), precision=prec)
                for b in sorted({args.batch_size, *extra_batches}):
                    times.setdefault((f"ORT only {prec} b{b}", "-"), []).append(
                        ort_only(extractor, xs, opts, b))
                    if extractor.execution_provider == "CUDAExecutionProvider":
                        times.setdefault((f"ORT on GPU {prec} b{b}", "-"), []).append(
                            on_device(extractor, xs, opts, b))
                if full_io is not None and prec == "fp16":
                    times.setdefault((f"ORT only fp16 b{args.batch_size} float32 IO", "-"),
                                     []).append(ort_only(full_io, xs, opts, args.batch_size))
                if extractor.pinned is not None and prec == "fp16":
                    # the same batches from and into pageable memory (DFF_PINNED=0)
                    times.setdefault((f"ORT only fp16 b{args.batch_size} pageable", "-"),
                                     []).append(ort_only(extractor, xs, opts, args.batch_size,
                                                         pageable=True))
                times.setdefault((f"in-process {prec}", "float32"), []).append(
                    in_process(extractor, items, opts))
                if not args.no_grpc:
                    t, req, resp = over_grpc(address, items, opts, args.streams)
                    times.setdefault((f"gRPC {prec} x{args.streams}", "float32"), []).append(t)
                    wire_bytes["float32"] = (req, resp)
            if args.no_grpc:
                continue
            for dtype in ("float32", "float16"):
                options = ExtractOptions(layers=(args.layer,), wire_dtype=dtype,
                                         precision=extractor.default_precision)
                times.setdefault(("in-process Extractor", dtype), []).append(
                    in_process(extractor, items, options))
                t, req, resp = over_grpc(address, items, options, args.streams)
                times.setdefault((f"gRPC loopback x{args.streams}", dtype), []).append(t)
                wire_bytes[dtype] = (req, resp)
                times.setdefault(("no-compute in-process", dtype), []).append(
                    in_process(null, items, options))  # type: ignore[arg-type]
                times.setdefault((f"no-compute gRPC x{args.streams}", dtype), []).append(
                    over_grpc(null_address, items, options, args.streams)[0])
                if dtype == "float32":  # decoded by the client: the server's share without it
                    t, req, resp = over_grpc(null_address, pixels, options, args.streams)
                    times.setdefault((f"no-compute gRPC px x{args.streams}", dtype), []
                                     ).append(t * n / len(pixels))
                    t, req, resp = over_grpc(address, pixels, options, args.streams)
                    times.setdefault((f"gRPC pixels x{args.streams}", dtype), []).append(
                        t * n / len(pixels))
                    wire_bytes["pixels"] = (req * n // len(pixels), resp * n // len(pixels))
        served_cpu: dict[str, tuple[float, float | None, float | None]] = {}
        if args.server_process and not args.no_grpc:
            served_cpu = served(args, items, precisions, pixels,
                                extractor.default_precision
                                if extractor.default_precision in precisions else "")
            for prec, (ips, _, _) in served_cpu.items():
                times[(f"gRPC served {prec} x{args.streams}", "float32")] = [n / ips]
            made = [(i, extractor.prepare(i, d, ExtractOptions(layers=(args.layer,))))
                    for i, d in items]
            prepared = [(i, PreparedInputs(p.features_input, p.classifier_input,
                                           p.original_size)) for i, p in made]
            sparse_opts = ExtractOptions(layers=(args.layer,), sparse=True)
            answers = [result_to_proto(r, sparse_opts).ByteSize()
                       for r in extractor.extract(items, sparse_opts)]
            wire_bytes["sparse"] = (wire_bytes.get("float32", (0, 0))[0],
                                    sum(answers) * n // len(answers))
            sent = [image_request(i, p).ByteSize() for i, p in prepared]
            wire_bytes["prepared"] = (sum(sent) * n // len(sent),  # totals over n, as above
                                      wire_bytes.get("float32", (0, 0))[1])
            for kind, figures in served_null(args, items, pixels, prepared).items():
                served_cpu[f"no-compute {kind}"] = figures
                times[(f"no-compute served {kind} x{args.streams}", "float32")] = [
                    n / figures[0]]
            if args.server_workers > 0:
                prec = (extractor.default_precision if extractor.default_precision in precisions
                        else precisions[0])
                variants = [(False, False), (True, False)] + ([(True, True)]
                                                              if prec != "int8" else [])
                for sparse, half in variants:
                    ips, server_ms, _, _ = scale_out(args, prec, sparse, half)
                    name = (f"scale-out {prec} prep{' f16' if half else ''}"
                            f"{' sparse' if sparse else ''} "
                            f"w{args.server_workers} c{args.client_procs}x{args.streams}")
                    times[(name, "float32")] = [n / ips]
                    served_cpu[name] = (ips, server_ms, None)
        load_after = os.getloadavg()[0]
        rows = []
        for (name, dtype), ts in times.items():
            kind = ("pixels" if "px" in name or "pixels" in name
                    else "prepared" if "prepared" in name
                    else "sparse" if "sparse" in name else dtype)
            req, resp = (wire_bytes.get(kind, (0, 0)) if "gRPC" in name or "served" in name
                         else (0, 0))
            rows.append((name, dtype, n / statistics.median(ts), req / n, resp / n))
    finally:
        server.stop(grace=2)
        null_server.stop(grace=2)

    out = sys.stdout
    out.write(f"\n{n} images ({args.data.name} photos, ~{np.mean([len(d) for _, d in items]):.0f}"
              f" B each), batch {args.batch_size}, layer {args.layer}, provider "
              f"{extractor.execution_provider}, wire rows at {extractor.default_precision}, "
              f"{args.repeat} interleaved repeats (median), "
              f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores"
              "\n\n")
    out.write(f"{cpu_description()}\n")
    out.write(f"{'path':<31}{'wire':<9}{'img/s':>8}{'vs fp32':>8}{'req B/img':>12}"
              f"{'resp B/img':>12}\n")
    ips_of = {r[0]: r[2] for r in rows}
    for name, dtype, ips, req, resp in rows:
        ref = ips_of.get(name.replace(" int8", " fp32").replace(" fp16", " fp32"))
        ratio = f"{ips / ref:.2f}x" if ref and any(p in name for p in ("int8", "fp16")) else ""
        out.write(f"{name:<31}{dtype:<9}{ips:>8.2f}{ratio:>8}{req:>12.0f}{resp:>12.0f}\n")
    for prec, (ips, server_ms, client_ms) in served_cpu.items():
        server = "n/a" if server_ms is None else (
            f"{server_ms:.2f} ms ({server_ms * ips / 1e3:.1f} cores busy)")
        client = "" if client_ms is None else (
            f", client {client_ms:.2f} ms ({client_ms * ips / 1e3:.1f} cores busy)")
        out.write(f"served {prec}: CPU per image: server {server}{client}\n")
    by = {(r[0].rsplit(" x", 1)[0].split(" Extractor")[0], r[1]): r[2] for r in rows}
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "provider": extractor.execution_provider, "images": n, "cpu": cpu_description(),
            "rows": [{"path": r[0], "wire": r[1], "img_s": r[2]} for r in rows],
            "served_cpu_ms_per_image": {p: {"server": v[1], "client": v[2]}
                                        for p, v in served_cpu.items()}}, indent=1))
    ref_prec = "fp32" if "fp32" in precisions else precisions[0]
    compute_ms = 1e3 / ips_of[f"ORT only {ref_prec} b{args.batch_size}"]
    for dtype in (() if args.no_grpc else ("float32", "float16")):
        ratio = by[("in-process", dtype)] / by[("gRPC loopback", dtype)]
        extra_ms = 1e3 * (1 / by[("no-compute gRPC", dtype)]
                          - 1 / by[("no-compute in-process", dtype)])
        out.write(f"overhead {dtype}: in-process / gRPC throughput = {ratio:.3f}; "
                  f"gRPC path without compute costs {extra_ms:+.1f} ms/image more than "
                  f"in-process ({ref_prec} compute: {compute_ms:.0f} "
                  "ms/image)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
