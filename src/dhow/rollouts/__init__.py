"""Deployments: traffic policies over model versions, the registry that keeps them, and their admin API."""
