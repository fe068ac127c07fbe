"""Model instances in worker processes (``instances.kind: process``) and the shared-memory channel to them."""
