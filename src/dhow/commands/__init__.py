"""The `dhow` command's admin subcommands that work on the stores directly, before or beside any server:
``keys`` and ``tenants`` (keys.py), ``audit`` (audit.py), ``models encrypt|rewrap|keygen`` (models.py).

They sit above the layers they use: one command may touch the access store, the audit trail and the repository.
"""
