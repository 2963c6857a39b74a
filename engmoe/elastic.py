"""``python -m engmoe.elastic``: torchrun (same arguments) that reports a clean pre-emption and user errors
as such, not as failures.

Plain torchrun, on SIGTERM, forwards the signal to its workers, waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``
seconds (default 30; the SLURM template derives it from the SIGTERM lead time so a checkpoint save fits),
SIGKILLs what is left and then exits 1 with a ``SignalException`` traceback, even when every worker saved
and exited 0. This wrapper runs torchrun in-process and:

* exits 0 after SIGTERM when the workers of this node recorded a clean pre-emption save (the trainer writes
  the marker file named by ``ENGMOE_PREEMPT_MARKER`` once the checkpoint is published), so SLURM sees the
  job step succeed and a requeue resumes from ``latest``; 128+signal otherwise;
* when workers fail with a user error (exit status 2, their one ``engmoe: error: …`` line already printed),
  exits 2 with one summary line instead of torchrun's ChildFailedError box.

torchrun itself still logs one warning line per event (``Received Signals.SIGTERM death signal, shutting
down workers`` and, for a failed worker, ``failed (exitcode: 2)``).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

MARKER_ENV = "ENGMOE_PREEMPT_MARKER"


def mark_clean_preemption(checkpoint: Optional[Path]) -> None:
    """Called by the trainer after a SIGTERM stop whose checkpoint is published (one rank per node)."""
    marker = os.environ.get(MARKER_ENV)
    if not marker or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    tmp = Path(marker + ".tmp")
    tmp.write_text(str(checkpoint or ""))
    os.replace(tmp, marker)


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = list(sys.argv[1:] if argv is None else argv)
    fd, marker = tempfile.mkstemp(prefix="engmoe-preempt-")
    os.close(fd)
    os.unlink(marker)  # exists only once a worker writes it
    os.environ[MARKER_ENV] = marker
    try:
        run(parse_args(argv))  # torchrun's main without its @record error box
        return 0
    except SignalException as e:
        if os.path.isfile(marker):
            saved = Path(marker).read_text().strip()
            print(f"engmoe: pre-empted (signal {int(e.sigval)}); workers stopped cleanly"
                  + (f", checkpoint {saved}" if saved else ""), file=sys.stderr, flush=True)
            return 0
        print(f"engmoe: error: stopped by signal {int(e.sigval)} before a pre-emption checkpoint was published "
              f"(raise TORCH_ELASTIC_SHUTDOWN_TIMEOUT={os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT', '30')} if "
              "the save needs longer)", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        ranks = sorted(e.failures)
        if codes == {2}:  # user errors: each rank printed its own one-line message
            print(f"engmoe: error: rank(s) {ranks} stopped on the error above", file=sys.stderr, flush=True)
            return 2
        rank, first = e.get_first_failure()
        print(f"engmoe: error: rank {rank} failed with exit code {first.exitcode} (its traceback is above)",
              file=sys.stderr, flush=True)
        return 1
    finally:
        if os.path.isfile(marker):
            os.unlink(marker)


if __name__ == "__main__":
    sys.exit(main())
