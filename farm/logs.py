"""Logging of farm's long-running processes (farm worker): one record per event.

A Celery worker redirects ``sys.stderr`` into its log and makes a record of every ``write()``:
an exception that ends a thread, printed by Python's default hook piece by piece, became hundreds
of records (``Exception in thread``, ``Thread-2``, a lone ``^`` ...). Here such an exception is
logged once, as one record whose traceback follows its message as one block.
"""

from __future__ import annotations

import logging
import sys
import threading

LOGGER = "farm"


def log_uncaught_exceptions() -> None:
    """Uncaught exceptions of threads and of the main thread go to the ``farm`` logger, one record each."""
    log = logging.getLogger(LOGGER)

    def in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        log.error("exception in thread %s: %s", name, args.exc_value, exc_info=args.exc_value)

    def in_main(kind, value, traceback) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, traceback)
            return
        log.critical("uncaught exception: %s", value, exc_info=(kind, value, traceback))

    threading.excepthook = in_thread
    sys.excepthook = in_main
