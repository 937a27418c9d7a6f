"""Signed webhook delivery: Standard Webhooks signing, transactional outbox, sender, SSRF guard."""
