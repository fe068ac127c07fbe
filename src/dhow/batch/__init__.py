"""The batch door: score datasets offline through the same core as the server (see ``runner``).

Engines: the embedded one (``local``), and Apache Spark (``spark``). Both enter the core through its one
admission point, ``CoreService.call``, one call per record batch.
"""

from dhow.batch.job import Job, input_format, parse_map, parse_model

__all__ = ["Job", "input_format", "parse_map", "parse_model"]
