"""The dashboard: web pages, JSON API and /metrics over the ledger."""
