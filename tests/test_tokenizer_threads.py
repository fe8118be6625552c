"""A pipeline's tokenizer from two threads at once (what a server does: the event loop checks a
request's words while the worker encodes a batch).  A Hugging Face fast tokenizer sets its
padding and truncation on each call, so without ``models.tokenizing.tokenizer_lock`` a padded
batch beside an unpadded single call fails now and then ("Unable to create tensor")."""

from __future__ import annotations

import threading

import pytest


@pytest.mark.slow
def test_checking_words_beside_encoding_a_batch_never_fails(unet_pipe):
    prompts = ["a red circle", "a large blue triangle in the bottom right on a beige background",
               "a small green square in the top left"]
    errors, stop = [], threading.Event()

    def check_words():
        while not stop.is_set():
            try:
                unet_pipe.unknown_words("a large yellow triangle in the center")
            except Exception as err:   # noqa: BLE001 - any failure is the finding
                errors.append(err)

    threads = [threading.Thread(target=check_words) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            try:
                unet_pipe.encode(prompts)
            except Exception as err:   # noqa: BLE001
                errors.append(err)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, f"{len(errors)} failures, first: {errors[0]!r}"
