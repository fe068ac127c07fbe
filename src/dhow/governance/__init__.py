"""Governance: the audit trail, PII masking and the data-residency policy."""
