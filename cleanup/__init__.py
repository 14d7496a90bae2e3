"""Periodic housekeeping, `python -m cleanup`: expiry, reaping, deadlines (no torch; runs from the API image)."""
