"""Starting or joining Ray according to the config."""

from __future__ import annotations

import logging
import os

from engine.config import RayConfig

log = logging.getLogger(__name__)


def ensure_ray(config: RayConfig) -> bool:
    """Connect to Ray if this process is not connected yet.

    With ``address: null`` a local single-node Ray starts in this process (``num_cpus`` and
    ``object_store_mb`` from the config); otherwise the process joins the given cluster.

    Returns:
        True when this call started or joined Ray (the caller may then shut it down), False if already connected.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    if config.address:
        ray.init(address=config.address, **kwargs)
    else:
        ray.init(
            num_cpus=config.num_cpus,
            object_store_memory=config.object_store_mb * 1024 * 1024 if config.object_store_mb else None,
            **kwargs,
        )
    log.info("ray: %s", ray.cluster_resources())
    return True
