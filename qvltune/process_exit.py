"""Ending a finished process without finalizing the interpreter: the worker on every rank, and the
``qvltune`` command itself.

A normal exit finalizes: it frees every object one by one before the process ends, which for a
process holding torch, transformers and a trained model is seconds of work the kernel does at once
anyway (the ``qvltune train`` parent, which imported the processor: 1.3 s on the 2-core CPU). And on
a CPU rank it is unsafe: DeepSpeed keeps gloo process groups that ``destroy_process_group`` cannot
drop; freed during finalization, gloo's threads can abort the process (SIGABRT, exit 134,
"terminate called without an active exception") after a completed run, seen once in the CPU suite
(2 ranks, ZeRO-3). What a normal exit does that matters is kept: the non-daemon threads are waited
for (a ``--force`` deletion, a background write) and the exit handlers run (torch's, the loggers'
flush), then the standard streams are flushed. ``threading._shutdown`` is what the interpreter
itself calls for the first; there is no public name for it. Every file the code writes is closed
when written.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Callable, NoReturn


def end_process(code: int, noted: Callable[[str], None] = lambda stage: None) -> NoReturn:
    """Exit with ``code`` as above. ``noted("returned")`` is called first and ``noted("handlers
    done")`` once the exit handlers ran (a rank's record keeps both: where a slow exit went)."""
    noted("returned")
    # What a normal exit does first, in its order: threading's own shutdown (it tells idle thread
    # pools to stop, then waits for every non-daemon thread: joining them by hand would wait forever
    # on a pool nobody shut down), then the exit handlers (torch's, the data loaders', loggers').
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except KeyboardInterrupt:  # Ctrl-C while it waits (a --force deletion): stop waiting, say so by the code
        code = code or 130
    noted("handlers done")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said
    os._exit(code)


def exit_code(e: SystemExit) -> int:
    """The status ``sys.exit(x)`` asks for: None is 0, a message is 1 (and is printed)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1
