"""Whether every node of the Ray cluster reaches a store (docs/design.md §5): shared by ``train`` (every rank opens
the store on its own node) and ``extract`` (parts are written on the detectors' nodes)."""

from __future__ import annotations


class StoreNotReachable(ValueError):
    """A local store path on a multi-node cluster, not declared a shared filesystem."""


def check_store_reachable(store: str, shared_fs: bool, who: str) -> None:
    """Refuse a local store path on a multi-node Ray cluster: a path on the driver's node may not exist on
    the others. Needs Ray connected.

    Args:
        store: the store argument; a URL (``s3://...``) is reachable from every node.
        shared_fs: the local path is a filesystem mounted at the same path on every node (``--store-shared-fs``).
        who: which processes open the store where, for the message (e.g. "every training worker opens the
            store on its own node").

    Raises:
        StoreNotReachable: a local path, no ``shared_fs``, and more than one alive node in the cluster.
    """
    import ray

    if "://" in store or shared_fs:
        return
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    if alive > 1:
        raise StoreNotReachable(
            f"store {store} is a local path but the Ray cluster has {alive} alive nodes, and {who}: put the "
            "store on s3:// or on a filesystem mounted at the same path on every node (then pass "
            "--store-shared-fs)"
        )
