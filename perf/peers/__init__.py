"""The Python peers: what a Python user writes instead of an Auth Proxy (for the load test)."""
