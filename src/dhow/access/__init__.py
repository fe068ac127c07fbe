"""Access: who is calling (API keys, JWTs, client certificates), what they may do (roles), and how much (quotas)."""
