"""The ``lamabus`` command as a subprocess, for tests that run it as people do."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

LAMABUS = str(Path(sys.executable).parent / "lamabus")


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without lamabus's or OpenAI's settings, a HOME of the test's own, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMABUS_", "OPENAI_"))}
    env["HOME"] = str(tmp_path / "home")
    return {**env, **extra}


async def run_cli(*args: str, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """``lamabus *args`` to its end (at most ``timeout`` seconds): exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(LAMABUS, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
