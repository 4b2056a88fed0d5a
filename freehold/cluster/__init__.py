"""Grow beyond one machine: replicas on a Ray cluster, and other OpenAI-compatible servers
(upstreams), behind the one gateway that keeps keys, quotas, the ledger and the audit log."""
