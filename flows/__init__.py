"""Prefect 3 flows over the `ddcolor` library (see flows/README.md)."""
