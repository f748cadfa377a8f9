"""The tf.data service's servers: the dispatcher and the workers that run SimSiam's
input pipeline on other hosts (TensorFlow's own engine, `tf.data.experimental.service`).

    python -m simsiam_tf.data_service dispatcher --port 5050 --work-dir /shared/dispatcher
    python -m simsiam_tf.data_service worker --dispatcher dispatcher-host:5050 --port 5051
    python train.py --dataset tfrecord:/shared/shards --data-service grpc://dispatcher-host:5050

The pipeline the workers run is registered by the trainers (`input.service`); these
servers know nothing of SimSiam. The dispatcher runs in fault-tolerant mode: it
journals its state in --work-dir, and a restarted dispatcher recovers its jobs.

This module imports TensorFlow only to start a server, so `--help` and bad arguments
answer at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

from simsiam_tf import tf_quiet
from simsiam_tf.cli import Parser

EXIT_DISPATCHER_LOST = 75  # EX_TEMPFAIL: a scheduler may retry the same command
HEARTBEAT_MS = 2000  # workers' heartbeats to the dispatcher


def split_target(target: str) -> tuple[str, str, int]:
    """'grpc://host:port' or 'host:port' -> ('grpc://host:port', host, port)."""
    from simsiam_tf.config import UsageError

    address = target.split("://", 1)[1] if "://" in target else target
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--data-service {target!r}: expected grpc://HOST:PORT, e.g. grpc://dispatcher-host:5050")
    return f"grpc://{host}:{port}", host, int(port)


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


STOP_GRACE_SECONDS = 10.0


def _serve(server, describe: str) -> int:
    """Block until SIGTERM or SIGINT, then stop the server and return 0.

    TensorFlow's `stop()` can outlast a scheduler's patience (once more than 30 s, for a
    dispatcher just recovered from its journal, on a loaded machine), so after
    STOP_GRACE_SECONDS the process exits without waiting for it. That loses nothing:
    a fault-tolerant dispatcher journals every change before acting on it, being built
    to survive SIGKILL, and a worker holds only elements in flight, which the tf.data
    service already treats as lost when a worker goes away.
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(describe, flush=True)
    while not stop.wait(1.0):
        pass
    stopping = threading.Thread(target=server.stop, daemon=True)
    stopping.start()
    stopping.join(STOP_GRACE_SECONDS)
    if stopping.is_alive():
        print(f"stopped (without waiting more than {STOP_GRACE_SECONDS:g} s for the server's own shutdown)", flush=True)
        os._exit(0)
    print("stopped", flush=True)
    return 0


def dispatcher_main(args) -> int:
    import tensorflow as tf

    svc = tf.data.experimental.service
    journal = os.path.join(args.work_dir, "tf_data_dispatcher_journal")
    recovering = os.path.isdir(journal) and bool(os.listdir(journal))
    os.makedirs(args.work_dir, exist_ok=True)
    server = svc.DispatchServer(
        svc.DispatcherConfig(
            port=args.port,
            work_dir=args.work_dir,
            fault_tolerant_mode=True,
            job_gc_timeout_ms=int(args.job_gc_timeout * 1000),
        )
    )
    port = int(server.target.rsplit(":", 1)[1])
    state = f"recovered its jobs from {journal}" if recovering else f"journal in {journal}"
    return _serve(
        server,
        f"tf.data service dispatcher serving grpc://{socket.getfqdn()}:{port} (fault-tolerant, {state}); "
        f"start workers with: python -m simsiam_tf.data_service worker --dispatcher {socket.getfqdn()}:{port}",
    )


def worker_main(args) -> int:
    import tensorflow as tf

    svc = tf.data.experimental.service
    target, host, port = split_target(args.dispatcher)
    deadline = time.monotonic() + args.wait
    while not reachable(host, port):
        if time.monotonic() > deadline:
            print(
                f"data_service worker: error: no dispatcher answers at {host}:{port} (waited {args.wait:.0f} s); "
                "start it first or fix --dispatcher",
                file=sys.stderr,
            )
            return 2
        time.sleep(1.0)
    advertised = args.worker_address or f"{socket.getfqdn()}:%port%"
    server = svc.WorkerServer(
        svc.WorkerConfig(
            dispatcher_address=f"{host}:{port}",
            worker_address=advertised,
            port=args.port,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
    )
    bound = server._address.rsplit(":", 1)[1]  # the port actually bound (--port 0 picks one)
    return _serve(
        server,
        f"tf.data service worker on {advertised.replace('%port%', bound)} (port {bound}), serving the "
        f"dispatcher at {host}:{port}: it runs SimSiam's input pipeline for any trainer using --data-service {target}",
    )


def check_args(args) -> None:
    """UsageError for a --dispatcher that is no HOST:PORT or a --work-dir that cannot be one."""
    from simsiam_tf.config import UsageError

    if args.role == "worker":
        try:
            split_target(args.dispatcher)
        except UsageError:  # its message names train.py's --data-service
            raise UsageError(f"--dispatcher {args.dispatcher!r}: expected HOST:PORT, e.g. dispatcher-host:5050")
    elif os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        raise UsageError(f"--work-dir {args.work_dir!r} is a file, not a directory; pass a directory for the journal")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m simsiam_tf.data_service",
        formatter_class=argparse.HelpFormatter,  # the description is one paragraph: wrap it
        description="tf.data service servers for train.py --data-service (docs/multi_worker.md). "
        "Restarting either with the same command line is safe: the dispatcher recovers its jobs "
        "from --work-dir, and a worker simply registers again.",
    )
    sub = p.add_subparsers(dest="role", required=True)
    d = sub.add_parser("dispatcher", help="the coordinator: one per cluster")
    d.add_argument("--port", type=int, default=5050, help="port to serve on (default 5050)")
    d.add_argument("--work-dir", required=True, help="journal directory (shared or local disk) for fault tolerance")
    d.add_argument("--job-gc-timeout", type=float, default=600, help="seconds before a job nobody reads is dropped (default 600)")
    w = sub.add_parser("worker", help="runs input pipelines: as many as the trainers need")
    w.add_argument("--dispatcher", required=True, help="HOST:PORT of the dispatcher")
    w.add_argument("--port", type=int, default=5051, help="port to serve on (default 5051; 0: any free port)")
    w.add_argument("--worker-address", help="HOST:PORT the trainers reach this worker at (default: this host's name)")
    w.add_argument("--wait", type=float, default=60, help="seconds to wait for the dispatcher at start (default 60)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from simsiam_tf.config import UsageError

    try:
        check_args(args)  # before TensorFlow: a bad address or --work-dir fails at once
        tf_quiet.import_tensorflow()
        return dispatcher_main(args) if args.role == "dispatcher" else worker_main(args)
    except UsageError as e:
        print(f"data_service {args.role}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
