"""The external channels delivery sends on (in-app is a write to the inbox, see inbox.py)."""
