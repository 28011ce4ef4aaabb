"""A two-node Ray cluster on 127.0.0.1, for tests/test_ray.py and benchmarks/ray_scale.py, and
the processes it starts (`descendants`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from kdata.executors.ray_executor import LOCAL_ENV

# What a Ray of this machine needs before it is imported: loopback only, no token file, no
# usage stats.
ENV = {**LOCAL_ENV, "RAY_USAGE_STATS_ENABLED": "0"}


def loopback_cluster(tmp: Path):
    """A head and a second node on 127.0.0.1, 2 logical CPUs each (with 1, an actor pool starved
    the read task), Ray's files under ``tmp`` (short: Ray's socket paths must be). Sets `ENV`
    and ``RAY_TMPDIR`` first. Each node's processes have a stage of their own for a run
    directory at a URL (``KDATA_STAGE``: ``tmp/stage-head``, ``tmp/stage-node``), as two
    machines with no filesystem in common would. The head runs a Ray Client server
    (``cluster.client_address``)."""
    (tmp / "ray").mkdir(exist_ok=True)
    os.environ.update(ENV, RAY_TMPDIR=str(tmp))
    from ray.cluster_utils import Cluster

    with socket.socket() as sock:  # the head's Ray Client server: ray://127.0.0.1:<port>
        sock.bind(("127.0.0.1", 0))
        client_port = sock.getsockname()[1]

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "temp_dir": str(tmp / "ray"),
            "env_vars": {"KDATA_STAGE": str(tmp / "stage-head")},
            "ray_client_server_port": client_port,
        },
    )
    cluster.client_address = f"ray://127.0.0.1:{client_port}"
    cluster.add_node(
        num_cpus=2, node_ip_address="127.0.0.1", env_vars={"KDATA_STAGE": str(tmp / "stage-node")}
    )
    return cluster


def descendants(root: int) -> set[int]:
    """The pids of every live process below ``root`` (read from /proc; Linux only)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.update(kids)
        todo += kids
    return out
