"""Fixtures and helpers shared by the UI tests (the app served on a port, the Train form's values)."""
