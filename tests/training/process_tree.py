"""Test helper: end a torchrun launcher and all its workers."""
from __future__ import annotations

import subprocess


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker (torch 2.13's torchrun starts each worker in its own session, so
    killing torchrun's process group would leave the workers training)."""
    import psutil

    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()
