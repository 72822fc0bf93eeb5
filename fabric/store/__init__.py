"""etcd, the fabric's only shared state: the client adapter (`datastore`, the one
module that imports etcd3), the key layout (`keys`), what can go wrong (`errors`,
importable without the client), live mirrors of a prefix (`watch`) and node and
workload registrations (`registry`)."""
