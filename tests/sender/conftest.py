"""Fixtures for the sender's tests."""
