"""The root of nbdsink's own exceptions, and the exit codes the CLI maps them to."""

from __future__ import annotations


class NbdsinkError(Exception):
    """Base of every error nbdsink reports to a user. ``exit_code`` is the CLI's exit status."""

    exit_code = 1


class UsageError(NbdsinkError):
    """A command was given arguments that cannot work (bad size, unknown name ...)."""

    exit_code = 2
