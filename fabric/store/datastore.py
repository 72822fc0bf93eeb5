"""The etcd adapter: connection, versioned JSON values, transactions.

This is the only module that imports `etcd3`. It turns gRPC failures into
`Unavailable` (with the endpoint), undecodable values into `CorruptValue` (with the
key), and offers the few primitives the rest of the code needs: get, list a prefix,
a transaction with compares, leases and prefix watches.

Values are JSON objects with a schema version `"v"`, so a reader can refuse a record
written by a newer layout instead of misreading it.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import etcd3
import etcd3.events
import etcd3.exceptions
import etcd3.utils
import grpc
from etcd3 import etcdrpc

from fabric.model import checks
from fabric.settings import EtcdSettings
from fabric.store.errors import CorruptValue, DatastoreError, Unavailable

T = TypeVar("T")

SCHEMA_VERSION = 1


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps({"v": SCHEMA_VERSION, **record}, separators=(",", ":"),
                      sort_keys=True).encode()


def decode(key: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptValue(key, f"not JSON ({exc})") from exc
    except RecursionError:
        raise CorruptValue(key, "not a record (nested too deeply to read)") from None
    if not isinstance(value, dict):
        raise CorruptValue(key, "not a JSON object")
    version = value.pop("v", None)
    if version != SCHEMA_VERSION:
        raise CorruptValue(key, f"schema version {version!r}, this build reads {SCHEMA_VERSION}")
    return value


@dataclass(frozen=True)
class Entry:
    """A decoded record with the revisions a later compare-and-swap needs."""

    key: str
    value: dict[str, Any]
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Listing:
    """A prefix read: the good records, the corrupt ones, and the store revision."""

    entries: list[Entry]
    corrupt: list[CorruptValue]
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    key: str
    value: dict[str, Any] | None  # None for a delete
    mod_revision: int
    error: CorruptValue | None = None


# Compare and operation builders, so callers never import etcd3 themselves.
def absent(key: str) -> Any:
    return etcd3.transactions.Version(key) == 0


def unchanged(key: str, mod_revision: int) -> Any:
    return etcd3.transactions.Mod(key) == mod_revision


def prefix_unchanged_since(prefix: str, revision: int) -> Any:
    """True when no key under `prefix` was created or modified after `revision`."""
    return etcd3.transactions.Mod(prefix, range_end=_prefix_end(prefix)) < revision + 1


def prefix_empty(prefix: str) -> Any:
    return etcd3.transactions.Version(prefix, range_end=_prefix_end(prefix)) == 0


def put(key: str, record: dict[str, Any], lease: Any = None) -> Any:
    return etcd3.transactions.Put(key, encode(record), lease=lease)


def delete(key: str) -> Any:
    return etcd3.transactions.Delete(key)


def delete_under(prefix: str) -> Any:
    return etcd3.transactions.Delete(prefix, range_end=_prefix_end(prefix))


@dataclass(frozen=True)
class Read:
    """One read inside `Datastore.read_many`: a key, or a prefix; optionally keys only."""

    key: str
    prefix: bool = False
    keys_only: bool = False


def get_op(key: str) -> Read:
    return Read(key)


def list_op(prefix: str) -> Read:
    return Read(prefix, prefix=True)


def keys_op(prefix: str) -> Read:
    """Keys under a prefix without their values: cheap when only existence matters."""
    return Read(prefix, prefix=True, keys_only=True)


def _prefix_end(prefix: str) -> bytes:
    return etcd3.utils.prefix_range_end(etcd3.utils.to_bytes(prefix))


# The rows of several reads (the method `Datastore.list` shadows `list` in the class).
Rows = builtins.list[builtins.list[Entry | CorruptValue]]

FAILOVER_PATIENCE = 3.0  # seconds a call keeps trying the members of an etcd cluster

# gRPC backs off reconnecting up to 120 s by default, failing every call meanwhile: an
# etcd back after an outage of a few seconds stayed "unreachable" for many more. Retry
# the connection within a second instead (etcd is local or on the same network).
# gRPC refuses replies over 4 MiB by default: a listing of about 13,000 workloads
# could never be read, and the agent could not start. Listings are read in pages
# (`list`); the larger limit covers transactions that read several prefixes at once.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 256 << 20),
]
PAGE = 1000  # keys per Range call of a listing

_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class Datastore:
    """A thin, thread-safe wrapper over one etcd client."""

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, settings: EtcdSettings) -> None:
        self._client = client
        self.settings = settings

    @classmethod
    def connect(cls, settings: EtcdSettings) -> Datastore:
        creds = None
        if any(e.secure for e in settings.endpoints):
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.ca_cert),
                private_key=_read(settings.key),
                certificate_chain=_read(settings.cert),
            )
        endpoints = [
            etcd3.Endpoint(e.target, e.port, secure=e.secure,
                           creds=creds if e.secure else None, time_retry=1.0,
                           opts=CHANNEL_OPTIONS)
            for e in settings.endpoints
        ]
        client = etcd3.MultiEndpointEtcd3Client(
            endpoints=endpoints, timeout=settings.timeout, failover=len(endpoints) > 1)
        return cls(client, settings)

    def close(self) -> None:
        self._client.close()

    # -- calls -------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One call, mapped to our errors. With several endpoints, a call that finds its
        endpoint gone is made again on the next one (etcd3 marks the dead one failed):
        an etcd member going away costs no caller an error (each member is tried at
        least once). Safe to repeat: reads are, and every write we make is a
        compare-and-swap (a repeat that finds its own first attempt applied fails its
        compare, and the caller reads what is there)."""
        if len(self.settings.endpoints) == 1:
            return self._call_once(fn, *args, **kwargs)
        # A cluster that lost its leader answers nothing until it has elected another
        # (about a second with etcd's defaults): keep trying the members that long.
        # And at least once on each member: a member powered off does not refuse, it
        # stays silent, so the attempt that found it gone waited out the whole call
        # timeout (5 s), longer than the patience, and the call failed although the
        # other members answered (an ADD failed so when the etcd leader's VM lost power).
        deadline = time.monotonic() + FAILOVER_PATIENCE
        attempts = 0
        while True:
            try:
                return self._call_once(fn, *args, **kwargs)
            except Unavailable:
                attempts += 1
                if time.monotonic() >= deadline and attempts >= len(self.settings.endpoints):
                    raise
                time.sleep(0.1)

    def _call_once(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (etcd3.exceptions.ConnectionFailedError,
                etcd3.exceptions.ConnectionTimeoutError,
                etcd3.exceptions.NoServerAvailableError) as exc:
            raise Unavailable(f"etcd at {self.settings.describe()} is unreachable") from exc
        except grpc.RpcError as exc:  # raised by the raw calls in read_many
            code = exc.code() if hasattr(exc, "code") else None
            if code in _UNAVAILABLE_CODES:
                # Same bookkeeping as etcd3's own calls: fail over to another endpoint.
                self._client.endpoint_in_use.fail()
                self._client._clear_old_stubs()
                raise Unavailable(
                    f"etcd at {self.settings.describe()} is unreachable") from exc
            raise DatastoreError(f"etcd error: {exc.details() if hasattr(exc, 'details') else exc}"
                                 ) from exc
        except ValueError as exc:
            # etcd3 raises ValueError when every endpoint is marked failed.
            if "failed" in str(exc):
                raise Unavailable(f"etcd at {self.settings.describe()} is unreachable") from exc
            raise

    def ping(self) -> int:
        """Round trip to etcd; returns the current revision."""
        status = self._call(self._client.status)
        return int(status.raft_index)

    def get(self, key: str) -> Entry | None:
        raw, meta = self._call(self._client.get, key)
        if raw is None:
            return None
        return Entry(key, decode(key, raw), meta.mod_revision, meta.create_revision,
                     meta.lease_id)

    def list(self, prefix: str, keys_only: bool = False) -> Listing:
        """Every record under `prefix`, read in pages of PAGE keys, all at the revision
        of the first page (one consistent view however large). Corrupt ones are
        reported, not raised."""
        end = _prefix_end(prefix)
        start: bytes = prefix.encode()
        revision: int | None = None
        kvs: builtins.list[Any] = []
        while True:
            response = self._call(self._client.get_range_response, start, end,
                                  sort_order="ascend", sort_target="key", limit=PAGE,
                                  revision=revision, keys_only=keys_only)
            if revision is None:
                revision = response.header.revision
            kvs.extend(response.kvs)
            if not response.more or not response.kvs:
                return _listing(kvs, revision, keys_only)
            start = response.kvs[-1].key + b"\0"

    def keys(self, prefix: str) -> builtins.list[str]:
        return [e.key for e in self.list(prefix, keys_only=True).entries]

    def put(self, key: str, record: dict[str, Any], lease: Any = None) -> None:
        self._call(self._client.put, key, encode(record), lease=lease)

    def delete(self, key: str) -> bool:
        return bool(self._call(self._client.delete, key))

    def delete_prefix(self, prefix: str) -> None:
        self._call(self._client.delete_prefix, prefix)

    def txn(self, compare: Iterable[Any], success: Iterable[Any],
            failure: Iterable[Any] = ()) -> tuple[bool, Rows]:
        """One transaction, built from etcd's protobufs.

        Reads (`Read`, which unlike etcd3's Get can ask for keys only) may appear in
        either branch and their rows come back in order (writes give an empty list),
        so a compare that failed can hand the caller fresh data in the same round trip.
        """
        success, failure = list(success), list(failure)
        client = self._client
        request = etcdrpc.TxnRequest(
            compare=[c.build_message() for c in compare],
            success=[self._request_op(op) for op in success],
            failure=[self._request_op(op) for op in failure])
        # The stub is looked up inside the call: with etcd down, merely reaching for it
        # raises (etcd3 marks the endpoint failed), and that must be Unavailable too.
        response = self._call(lambda: client.kvstub.Txn(
            request, client.timeout, credentials=client.call_credentials,
            metadata=client.metadata))
        ops = success if response.succeeded else failure
        return bool(response.succeeded), [
            _rows(op, r.response_range.kvs) if isinstance(op, Read) else []
            for op, r in zip(ops, response.responses, strict=True)]

    def read_many(self, reads: Iterable[Read]) -> Rows:
        """Several reads in one round trip: one read-only (linearizable) transaction."""
        return self.txn([], reads)[1]

    def _request_op(self, op: Any) -> Any:
        if isinstance(op, Read):
            return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
                key=op.key.encode(), range_end=_prefix_end(op.key) if op.prefix else b"",
                keys_only=op.keys_only))
        if isinstance(op, etcd3.transactions.Put):
            return etcdrpc.RequestOp(request_put=self._client._build_put_request(
                op.key, op.value, op.lease, op.prev_kv))
        if isinstance(op, etcd3.transactions.Delete):
            return etcdrpc.RequestOp(request_delete_range=self._client._build_delete_request(
                op.key, op.range_end, op.prev_kv))
        raise TypeError(f"not a transaction operation: {op!r}")

    # -- leases ------------------------------------------------------------------------
    def lease(self, ttl: int) -> Any:
        return self._call(self._client.lease, ttl)

    def refresh(self, lease: Any) -> int:
        """Keep a lease alive; returns the TTL etcd granted (0 when the lease is gone)."""
        responses = self._call(lambda: list(self._client.refresh_lease(lease.id)))
        return int(responses[0].TTL) if responses else 0

    def lease_remaining(self, lease_id: int) -> tuple[int, int]:
        """(remaining TTL, granted TTL) of a lease; remaining is -1 when it expired."""
        info = self._call(self._client.get_lease_info, lease_id)
        return int(info.TTL), int(info.grantedTTL)

    def revoke(self, lease: Any) -> None:
        self._call(self._client.revoke_lease, lease.id)

    # -- watches -----------------------------------------------------------------------
    def watch_prefix(self, prefix: str, start_revision: int | None = None
                     ) -> tuple[Iterator[builtins.list[WatchEvent]], Callable[[], None]]:
        """Batches of decoded events under `prefix`, and a function that cancels the watch.

        The iterator ends (or raises `Unavailable`) when the watch breaks; the caller
        re-lists and watches again from the listing's revision.
        """
        kwargs: dict[str, Any] = {}
        if start_revision is not None:
            kwargs["start_revision"] = start_revision
        responses, cancel = self._call(self._client.watch_prefix_response, prefix, **kwargs)

        def batches() -> Iterator[list[WatchEvent]]:
            try:
                for response in responses:
                    yield [_watch_event(ev) for ev in response.events]
            except (grpc.RpcError, etcd3.exceptions.Etcd3Exception) as exc:
                raise Unavailable(f"watch on {prefix} broke: {exc}") from exc

        return batches(), cancel


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def _rows(read: Read, kvs: Iterable[Any]) -> list[Entry | CorruptValue]:
    rows: list[Entry | CorruptValue] = []
    for kv in kvs:
        key = kv.key.decode()
        if read.keys_only:
            rows.append(Entry(key, {}, kv.mod_revision, kv.create_revision, kv.lease))
            continue
        try:
            rows.append(Entry(key, decode(key, kv.value), kv.mod_revision, kv.create_revision,
                              kv.lease))
        except CorruptValue as exc:
            rows.append(exc)
    return rows


def _listing(kvs: Iterable[Any], revision: int, keys_only: bool) -> Listing:
    entries: list[Entry] = []
    corrupt: list[CorruptValue] = []
    for kv in kvs:
        key = kv.key.decode()
        if keys_only:
            entries.append(Entry(key, {}, kv.mod_revision, kv.create_revision, kv.lease))
            continue
        try:
            entries.append(Entry(key, decode(key, kv.value), kv.mod_revision,
                                 kv.create_revision, kv.lease))
        except CorruptValue as exc:
            corrupt.append(exc)
    return Listing(entries, corrupt, revision)


def _watch_event(ev: Any) -> WatchEvent:
    """etcd3 hands watch events over wrapped (PutEvent / DeleteEvent)."""
    key = ev.key.decode()
    if isinstance(ev, etcd3.events.DeleteEvent):
        return WatchEvent(key, None, ev.mod_revision)
    try:
        return WatchEvent(key, decode(key, ev.value), ev.mod_revision)
    except CorruptValue as exc:
        return WatchEvent(key, None, ev.mod_revision, error=exc)


def parsed(entry: Entry, parse: Callable[[dict[str, Any]], T], kind: str) -> T:
    """One record, or CorruptValue naming its key and what is wrong with it: a record
    another writer left must fail as a datastore error, not as whatever exception the
    parser happened to meet."""
    try:
        return parse(entry.value)
    except checks.NOT_A_RECORD as exc:
        raise CorruptValue(entry.key, f"not a {kind} record ({exc})") from exc


def readable(listing: Listing, parse: Callable[[dict[str, Any]], T], kind: str,
             log: Any) -> list[T]:
    """The records of a listing that parse; the others are logged and left out.

    One record written by hand or by another version must not stop every listing,
    nor a check against the others (a new pool against the nodes): an unreadable
    record cannot be checked against, and must not block an unrelated change.
    """
    found = []
    for bad in listing.corrupt:
        log.warning(f"{kind} record unreadable", key=bad.key, reason=bad.reason)
    for entry in listing.entries:
        try:
            found.append(parse(entry.value))
        except checks.NOT_A_RECORD as exc:
            log.warning(f"{kind} record unreadable", key=entry.key, reason=str(exc))
    return found
