"""Rendezvous settings of a ``torchrun`` launch: one node (``--standalone``) or N nodes (c10d rendezvous).

Multi-node training keeps PyTorch's own engine: every node runs the same ``torchrun`` command with its own
``--node-rank``; the ranks meet at ``--rdzv-endpoint`` (a host:port that every node reaches: node 0's address, or
the headless Service of infra/k8s/examples/train-multinode-job.yaml) and agree on ``--rdzv-id``. The c10d backend
needs no etcd: the first agent to arrive hosts the store at the endpoint (use node 0's host). Example, 2 nodes x 4
GPUs::

    node 0:  torchrun --nnodes 2 --node-rank 0 --nproc_per_node 4 --rdzv-backend c10d \\
                 --rdzv-endpoint node0:29400 --rdzv-id run-42 -m ddcolor.cli train ...
    node 1:  the same with --node-rank 1
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_RDZV_PORT", "RDZV_BACKENDS", "Rendezvous"]

DEFAULT_RDZV_PORT = 29400  # torchrun's default c10d port
RDZV_BACKENDS = ("c10d", "static")


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the nodes of one training run meet.

    Attributes:
        nnodes: nodes in the run (1: ``--standalone``, nothing else is needed).
        node_rank: this node's index, 0 .. nnodes - 1 (node 0 hosts the c10d store).
        endpoint: ``host[:port]`` every node reaches (port default `DEFAULT_RDZV_PORT`); required for nnodes > 1.
        backend: ``c10d`` (elastic rendezvous, no extra service) or ``static`` (fixed ranks via MASTER_ADDR).
        run_id: the rendezvous id, the same on every node of a run and different between runs.
    """

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None
    backend: str = "c10d"
    run_id: str = "ddcolor"

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in 0..{self.nnodes - 1} (nnodes={self.nnodes}), got {self.node_rank}")
        if self.backend not in RDZV_BACKENDS:
            raise ValueError(f"rdzv backend {self.backend!r}: use one of {', '.join(RDZV_BACKENDS)}")
        if self.nnodes > 1 and not self.endpoint:
            raise ValueError(
                f"nnodes={self.nnodes} needs a rendezvous endpoint (--rdzv-endpoint HOST:PORT that every node reaches, "
                "e.g. node 0's address or the Job's headless Service)"
            )

    @property
    def standalone(self) -> bool:
        return self.nnodes == 1 and not self.endpoint

    def torchrun_args(self, nproc_per_node: int) -> list[str]:
        """The ``torchrun`` options before the program (``-m ddcolor.cli train ...``)."""
        if nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
        if self.standalone:
            return ["--standalone", "--nproc_per_node", str(nproc_per_node)]
        endpoint = self.endpoint if ":" in str(self.endpoint) else f"{self.endpoint}:{DEFAULT_RDZV_PORT}"
        return [
            "--nnodes",
            str(self.nnodes),
            "--node_rank",
            str(self.node_rank),
            "--nproc_per_node",
            str(nproc_per_node),
            "--rdzv_backend",
            self.backend,
            "--rdzv_endpoint",
            endpoint,
            "--rdzv_id",
            self.run_id,
        ]
