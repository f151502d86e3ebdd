"""The teacher engine's durable request cache: a local sqlite file, in front of a shared store.

`DISTILLERY_CACHE` says where answers are kept: a local folder (the sqlite file only, the default)
or an fsspec URI (`s3://bucket/prefix`, `gs://...`, `file:///shared/mount`) that workers on many
machines share. A shared store holds one create-only object per request key, so two workers that
answer the same request never overwrite each other: the second adopts the first's answer. The
local sqlite file stays as the first level: a hit in the shared store fills it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import fsspec

from distillery.tasks.cost import SpendLedger
from distillery.tasks.teacher.base import CallStats, ChatResult, EngineSettings, TeacherError

SQLITE_NAME = "teacher-cache.sqlite"
# Threads that wait on the shared store for the engine's loop (reads and create-only writes):
# enough for the default 32 requests in flight to upload their answers at once.
SHARED_IO_THREADS = 32


class CacheError(TeacherError):
    """The request cache named by DISTILLERY_CACHE cannot be used; the message names the fix."""


class SharedStore:
    """Create-only objects under one fsspec URI; `name`s are paths relative to it."""

    def __init__(self, uri: str, setting: str = "DISTILLERY_CACHE") -> None:
        self.uri = uri.rstrip("/")
        self._setting = setting
        try:
            # Its own filesystem object: fsspec's instance cache would hand every store the
            # first one's credentials and session.
            protocol = fsspec.core.split_protocol(self.uri)[0]
            # botocore keeps 10 connections a client by default: fewer than the answers in
            # flight that upload at once, or the GETs of one look-up.
            options = (
                {"config_kwargs": {"max_pool_connections": 2 * SHARED_IO_THREADS}}
                if protocol in ("s3", "s3a")
                else {}
            )
            self.fs, root = fsspec.core.url_to_fs(self.uri, skip_instance_cache=True, **options)
        except (ValueError, ImportError) as exc:
            raise CacheError(
                f"{setting}={uri!r} is not a usable store ({exc}): give a local folder or a URI "
                "such as s3://bucket/prefix (s3fs installed for s3://, gcsfs for gs://)."
            ) from None
        self.root = root.rstrip("/")
        self._local = "file" in _protocols(self.fs)
        self._probe()

    def _probe(self) -> None:
        """Fail now, naming the setting, rather than at the first answer of a long run."""
        if self._local:
            self.fs.makedirs(self.root, exist_ok=True)
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise CacheError(
                f"{self._setting}={self.uri}: the bucket {bucket!r} does not exist at this "
                "endpoint: create it (e.g. `aws s3 mb s3://" + bucket + "`) or fix the URI "
                "(and AWS_ENDPOINT_URL_S3 for a non-AWS store)."
            ) from None
        except PermissionError as exc:
            raise CacheError(
                f"{self._setting}={self.uri}: access denied ({exc}): the credentials need read, "
                "write and list rights on the bucket (s3:GetObject, s3:PutObject, s3:ListBucket)."
            ) from None
        except _credential_errors() as exc:
            raise CacheError(
                f"{self._setting}={self.uri}: no credentials for the store ({exc}): set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a role on the "
                "worker), or point DISTILLERY_CACHE at a local folder."
            ) from None
        except OSError as exc:
            raise CacheError(
                f"{self._setting}={self.uri}: the store cannot be reached ({exc}): check the "
                "endpoint (AWS_ENDPOINT_URL_S3) and the network, or point DISTILLERY_CACHE at a "
                "local folder."
            ) from None

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` unless it exists (True: written). On S3 `xb` is one conditional PUT
        (`If-None-Match: *`, s3fs), so of two racing writers exactly one wins."""
        path = self.path(name)
        try:
            if self._local:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                with self.fs.open(path, "xb") as f:
                    f.write(data)
            else:
                # One PUT with If-None-Match: * (s3fs: mode="create"); fs.open(path, "xb") sends
                # the same PUT on close but first a HEAD and a LIST: three round trips, not one.
                self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def write(self, name: str, data: bytes) -> None:
        """Write `name`, replacing it: only for objects that one writer owns (SpendLedger)."""
        path = self.path(name)
        if not self._local:
            self.fs.pipe_file(path, data)  # one PUT: a reader sees the old or the new object
            return
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        part = f"{path}.{uuid.uuid4().hex}.part"  # renamed into place: never read half-written
        self.fs.pipe_file(part, data)
        self.fs.mv(part, path)

    def read(self, name: str) -> bytes | None:
        return self.read_many([name]).get(name)

    def read_many(self, names: Sequence[str]) -> dict[str, bytes]:
        """The objects that exist among `names`, fetched concurrently (fsspec's `cat` of a
        list: one request each, many in flight), not one round trip after another."""
        if not names:
            return {}
        paths = [self.path(n) for n in names]
        got = self.fs.cat(paths, on_error="return")
        if len(paths) == 1 and not isinstance(got, dict):  # a single path comes back bare
            got = {paths[0]: got}
        found: dict[str, bytes] = {}
        for name, path in zip(names, paths, strict=True):
            value = got.get(self.fs._strip_protocol(path), got.get(path))
            if isinstance(value, FileNotFoundError) or value is None:
                continue
            if isinstance(value, BaseException):
                raise CacheError(
                    f"{self._setting}={self.uri}: reading {name} failed ({value!r}); check the "
                    "store's credentials and endpoint."
                ) from value
            found[name] = value
        return found

    def names(self, folder: str) -> list[str]:
        """The objects under `folder` (recursive), relative to the store; fresh, not cached."""
        path = self.path(folder)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        start = len(self.fs._strip_protocol(self.root)) + 1
        return sorted(self.fs._strip_protocol(p)[start:] for p in found)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _credential_errors() -> tuple[type[BaseException], ...]:
    """botocore's "no credentials" errors (not OSErrors), when botocore is installed."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return ()
    return (NoCredentialsError, PartialCredentialsError)


class RequestCache:
    """Durable, content-addressed store of teacher answers: a local sqlite file (one row is
    committed per answer), read through to a SharedStore when one is given.

    A miss locally is looked up in the shared store (many keys at once) and a hit fills the
    local file; a new answer goes to the shared store first (create-only), then locally. When
    another worker stored the same key first, `put` returns that worker's answer: every worker
    then uses the same one.
    """

    def __init__(self, path: Path, shared: SharedStore | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.shared = shared
        # Autocommit + WAL + synchronous=NORMAL: each insert is durable against a killed process
        # (it is in the WAL) without an fsync per answer.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, result TEXT NOT NULL, "
            "created_at REAL NOT NULL)"
        )
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if shared is not None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                SHARED_IO_THREADS, thread_name_prefix="distillery-cache"
            )
        self.shared_hits = 0  # answers found in the shared store, not in the local file
        self.shared_lost = 0  # answers another worker had stored first (their answer is used)

    def get_many(self, keys: Sequence[str]) -> dict[str, ChatResult]:
        found = self._get_local(keys)
        if self.shared is not None and len(found) < len(keys):
            missing = [k for k in keys if k not in found]
            blobs = self.shared.read_many([object_name(k) for k in missing])
            filled = {k: blobs[object_name(k)].decode() for k in missing if object_name(k) in blobs}
            self._put_local(filled)
            self.shared_hits += len(filled)
            found.update((k, ChatResult(**json.loads(b))) for k, b in filled.items())
        return found

    def _get_local(self, keys: Sequence[str]) -> dict[str, ChatResult]:
        found: dict[str, ChatResult] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, result FROM responses WHERE key IN ({marks})", chunk
                )
                for key, blob in rows:
                    found[key] = ChatResult(**json.loads(blob))
        return found

    def put(self, key: str, result: ChatResult) -> ChatResult:
        """Store an answer; returns the answer kept for `key` (another worker's, if it won)."""
        blob = json.dumps(asdict(result))
        # Locally first: should the shared store fail now, the paid answer is still kept here.
        self._put_local({key: blob})
        if self.shared is not None and not self.shared.create(object_name(key), blob.encode()):
            stored = self.shared.read(object_name(key))
            if stored is not None:
                self.shared_lost += 1
                self._put_local({key: stored.decode()})
                result = ChatResult(**json.loads(stored))
        return result

    def put_many(self, results: Mapping[str, ChatResult]) -> dict[str, ChatResult]:
        """`put` for many answers (a collected batch), the shared writes concurrently."""
        if self._pool is None:
            self._put_local({k: json.dumps(asdict(r)) for k, r in results.items()})
            return dict(results)
        futures = {k: self._pool.submit(self.put, k, r) for k, r in results.items()}
        return {k: f.result() for k, f in futures.items()}

    def _put_local(self, blobs: Mapping[str, str]) -> None:
        if not blobs:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")  # one commit, not one per answer
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                    ((k, b, now) for k, b in blobs.items()),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # The engine's loop must not wait on the network: with a shared store, the same calls run
    # on the cache's threads. Without one they stay inline (a local sqlite write is fast).
    async def aget_many(self, keys: Sequence[str]) -> dict[str, ChatResult]:
        if self._pool is None:
            return self.get_many(keys)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.get_many, keys)

    async def aput(self, key: str, result: ChatResult) -> ChatResult:
        if self._pool is None:
            return self.put(key, result)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.put, key, result)

    async def aput_many(self, results: Mapping[str, ChatResult]) -> dict[str, ChatResult]:
        if self._pool is None:
            return self.put_many(results)
        # On a thread of the default executor: put_many itself waits on the cache's threads.
        return await asyncio.to_thread(self.put_many, results)

    def keys(self) -> Iterable[str]:
        """Every key in the local file (for tests and inspection)."""
        with self._lock:
            return [k for (k,) in self._db.execute("SELECT key FROM responses")]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            self._db.close()


def object_name(key: str) -> str:
    """Where a request key's answer lies in the shared store (fanned out by its first bytes)."""
    return f"requests/{key[:2]}/{key}.json"


def is_uri(location: str) -> bool:
    return "://" in location


def open_cache(settings: EngineSettings) -> RequestCache:
    """The request cache that settings name: DISTILLERY_CACHE (a folder or a store URI), else the
    folder DISTILLERY_CACHE_DIR; with a store, the sqlite file stays in DISTILLERY_CACHE_DIR."""
    location = settings.cache
    if location is None or not is_uri(location):
        folder = Path(location).expanduser() if location else settings.cache_dir
        return RequestCache(folder / SQLITE_NAME)
    return RequestCache(settings.cache_dir / SQLITE_NAME, SharedStore(location))


def records_store(settings: EngineSettings, cache: RequestCache) -> SharedStore:
    """Where the records that workers share live beside the answers (the spend ledger): the
    shared store, or the local cache folder when there is none."""
    return cache.shared if cache.shared is not None else SharedStore(str(cache.path.parent))


def spend_ledger(
    settings: EngineSettings, cache: RequestCache, totals: CallStats
) -> SpendLedger | None:
    """With DISTILLERY_BUDGET_ID: this engine's entry in the budget's ledger, synced every
    spend_sync_s on a thread of its own; without one, None (a budget of this process only)."""
    if settings.budget_id is None:
        return None

    def own() -> dict[str, float]:
        return {
            "usd": totals.cost_usd or 0.0,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
        }

    ledger = SpendLedger(records_store(settings, cache), settings.budget_id, own)
    ledger.start(settings.spend_sync_s)
    return ledger
