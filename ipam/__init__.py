"""IP address management on etcd: pools, host-affine blocks, allocations by handle.

`pools` and `blocks` are pure (validation, block math, choices); `allocator` is the
etcd adapter that turns those choices into compare-and-swap transactions; `check`
finds leaks and inconsistencies in a snapshot and `gc` frees them safely.
"""
