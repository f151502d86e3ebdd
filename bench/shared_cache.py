"""Lookups and writes of the shared request cache (DISTILLERY_CACHE=s3://...) against moto.

    .venv/bin/python bench/shared_cache.py --keys 2000

moto runs in server mode on 127.0.0.1 in a process of its own; on a 2-core machine its CPU time
still competes with the client's. Against real S3 a round trip is longer (tens of ms) and the
server's CPU is not ours, which favours the concurrent look-up even more.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2000)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    # Its own process, as an S3 endpoint is: in this one it would share the GIL with the client.
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import s3fs

    from distillery.tasks.teacher.base import ChatResult
    from distillery.tasks.teacher.cache import SQLITE_NAME, RequestCache, SharedStore, object_name

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
    store = SharedStore("s3://bench/cache")
    answer = ChatResult("x" * 600, "stop", 300, 150, "m", "r")
    keys = [f"{i:064x}" for i in range(args.keys)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        writer = RequestCache(Path(tmp) / "w" / SQLITE_NAME, store)
        started = time.perf_counter()
        writer.put_many({k: replace(answer, content=k) for k in keys})
        rows.append(("create-only writes (32 threads)", time.perf_counter() - started))
        writer.close()

        started = time.perf_counter()
        for key in keys[: args.keys // 4]:  # a quarter: serial is slow
            store.read(object_name(key))
        serial = (time.perf_counter() - started) * 4
        rows.append(("one GET after another (timed on a quarter, x4)", serial))

        reader = RequestCache(Path(tmp) / "r" / SQLITE_NAME, store)
        started = time.perf_counter()
        found = reader.get_many(keys)
        rows.append(
            ("get_many, empty local sqlite (concurrent GETs)", time.perf_counter() - started)
        )
        assert len(found) == len(keys) and reader.shared_hits == len(keys)
        started = time.perf_counter()
        reader.get_many(keys)
        rows.append(("get_many again, all in the local sqlite", time.perf_counter() - started))
        reader.close()
    server.terminate()
    server.wait()
    print(f"| {args.keys:,} keys against moto | seconds | keys/s |\n|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {args.keys / seconds:,.0f} |")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
