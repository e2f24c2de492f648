"""Errors that a user of the generation scripts can cause and fix; the scripts turn them into exit status 2."""
from __future__ import annotations

import argparse

EXIT_USAGE = 2  # exit status for every user-caused error (the status argparse uses for bad flags)


class UsageError(Exception):
    """A problem with the user's input (flags, files, images, prompts): one readable message naming the fix."""


class UsageParser(argparse.ArgumentParser):
    """ArgumentParser whose errors become UsageError (one message, exit status 2, handled by the scripts)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")
