"""A synthetic B2B SaaS world that drives NBV through its public APIs (docs/data-science.md)."""
