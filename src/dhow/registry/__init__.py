"""dhow's own databases: one connection helper for SQLite and PostgreSQL with numbered migrations."""

from dhow.registry.database import Database, Dialect, Migration, Session, redact_url, utc_now

__all__ = ["Database", "Dialect", "Migration", "Session", "redact_url", "utc_now"]
