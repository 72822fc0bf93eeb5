"""What can go wrong with the datastore, without importing its client.

Pure modules (the IPAM check, the CLI's error handling) name these errors without
pulling etcd3 and gRPC in; `fabric.store.datastore` raises them.
"""

from __future__ import annotations


class DatastoreError(Exception):
    """Base of every datastore failure."""


class Unavailable(DatastoreError):
    """etcd could not be reached or did not answer in time."""


class CorruptValue(DatastoreError):
    """A stored value is not a record we can read; names the key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt value at {key}: {reason}")
        self.key = key
        self.reason = reason


class Conflict(DatastoreError):
    """A read-modify-write kept losing races and gave up."""
