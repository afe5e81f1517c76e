"""Thin routers, one per resource: parse, call the scorer / store / registry, return a model."""
