"""Access control: API keys with scopes, publishable widget keys, per-key rate limits, and the
one middleware that enforces them (docs/security.md)."""
