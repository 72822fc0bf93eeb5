"""The etcd key layout: the one place that knows where each record lives.

Everything is under one versioned root so a future layout can live beside this one.
`docs/datastore.md` describes the same layout for people; keep the two in step.
"""

from __future__ import annotations

ROOT = "/l3fabric/v1/"

POOLS = ROOT + "ipam/pools/"
BLOCKS = ROOT + "ipam/blocks/"
AFFINITY = ROOT + "ipam/affinity/"
IPS = ROOT + "ipam/ips/"
HANDLES = ROOT + "ipam/handles/"
BORROWED = ROOT + "ipam/borrowed/"
NODES = ROOT + "nodes/"
LIVENESS = ROOT + "liveness/"
WORKLOADS = ROOT + "workloads/"
BGP_CONFIG = ROOT + "bgp/config"
BGP_PEERS = ROOT + "bgp/peers/"
POLICIES = ROOT + "policy/policies/"
NAMESPACES = ROOT + "policy/namespaces/"


def block_id(cidr: str) -> str:
    """`10.244.3.0/26` -> `10.244.3.0-26`: a CIDR made safe as one key segment."""
    return cidr.replace("/", "-")


def cidr_of_block_id(segment: str) -> str:
    net, _, length = segment.rpartition("-")
    return f"{net}/{length}"


def pool(name: str) -> str:
    return POOLS + name


def block(cidr: str) -> str:
    return BLOCKS + block_id(cidr)


def affinity_prefix(node: str) -> str:
    return f"{AFFINITY}{node}/"


def affinity(node: str, cidr: str) -> str:
    return affinity_prefix(node) + block_id(cidr)


def ips_prefix(block_cidr: str) -> str:
    return f"{IPS}{block_id(block_cidr)}/"


def ip(block_cidr: str, ordinal: int) -> str:
    return f"{ips_prefix(block_cidr)}{ordinal}"


def handle(handle_id: str) -> str:
    return HANDLES + handle_id


def borrowed_prefix(node: str) -> str:
    return f"{BORROWED}{node}/"


def borrowed(node: str, address: str) -> str:
    return borrowed_prefix(node) + address


def node(name: str) -> str:
    return NODES + name


def liveness(name: str) -> str:
    return LIVENESS + name


def workloads_prefix(node_name: str) -> str:
    return f"{WORKLOADS}{node_name}/"


def workload(node_name: str, handle_id: str) -> str:
    return workloads_prefix(node_name) + handle_id


def bgp_peer(name: str) -> str:
    return BGP_PEERS + name


def policy(namespace: str, name: str) -> str:
    return f"{POLICIES}{namespace}/{name}"


def policies_prefix(namespace: str) -> str:
    return f"{POLICIES}{namespace}/"


def namespace(name: str) -> str:
    return NAMESPACES + name


def last_segment(key: str) -> str:
    return key.rsplit("/", 1)[-1]
