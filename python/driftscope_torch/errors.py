"""The one error type for bad input: the CLI prints its message and exits with code 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad input (a file, a flag, a prompt, a point map).

    The message names the file and line (``FILE:LINE: problem``) or the flag, and is meant to be
    shown to the user as is, without a traceback.
    """
