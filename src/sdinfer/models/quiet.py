"""Loading a model without diffusers' and transformers' chatter, for that call only.

diffusers warns "Cannot initialize model with low cpu memory usage" (when ``accelerate`` is not
installed) and transformers draws a "Loading weights" bar on every ``from_pretrained``.  Around
the loads sdinfer makes itself both libraries are set to errors only and no progress bars, and
set back afterwards, so a user's own logging settings are left as they were.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet_loading():
    import diffusers
    import transformers

    saved = [(lib.utils.logging, lib.utils.logging.get_verbosity(), lib.utils.logging.is_progress_bar_enabled())
             for lib in (diffusers, transformers)]
    for log, _, _ in saved:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, level, bar in saved:
            log.set_verbosity(level)
            if bar:
                log.enable_progress_bar()
