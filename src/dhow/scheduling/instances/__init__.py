"""Model instances in worker processes (``instances.kind: process``) and the shared-memory channel to them."""

from dhow.scheduling.instances.process import ProcessInstance, load_process_instances

__all__ = ["ProcessInstance", "load_process_instances"]
