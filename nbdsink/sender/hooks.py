"""Pre- and post-freeze hooks: shell commands run around the freeze for application consistency.

A pre-hook typically tells a database to flush and hold writes; the post-hook releases it.
Each runs with a timeout; its output goes to the sender's log.
"""

from __future__ import annotations

import logging
import os
import subprocess

import trio

from nbdsink.sender.errors import HookError

log = logging.getLogger(__name__)


async def run_hook(command: str, *, phase: str, timeout: float, env: dict[str, str]) -> None:
    """Run ``command`` through ``/bin/sh -c``; a non-zero exit or a timeout is a HookError."""
    full_env = {**os.environ, "NBDSINK_HOOK": phase, **env}
    started = trio.current_time()
    with trio.move_on_after(timeout) as scope:
        result = await trio.run_process(
            ["/bin/sh", "-c", command],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
            env=full_env,
            stdin=subprocess.DEVNULL,
        )
    if scope.cancelled_caught:
        raise HookError(f"{phase} hook {command!r} did not finish within {timeout:g}s")
    output = (result.stdout + result.stderr).decode(errors="replace").strip()
    log.info("%s hook %r: exit status %d after %.3fs", phase, command, result.returncode,
             trio.current_time() - started)
    if output:
        log.info("%s hook output: %s", phase, output)
    if result.returncode != 0:
        raise HookError(f"{phase} hook {command!r} exited with status {result.returncode}")
