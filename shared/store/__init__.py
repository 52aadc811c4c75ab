"""The store: models, engine and migrations."""
