"""Fixtures shared by the Hub, inference and app tests: the fake Hub, trained run folders."""
