"""Errors the CLI turns into one clear line (exit 2) instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: an unknown name, an out-of-range parameter, an unusable path."""


class SpecError(UserError):
    """A model spec (``name:key=value,...``) that cannot be parsed or bound."""


class PromptError(UserError):
    """A prompt the backbone cannot interpret."""


class CheckpointError(UserError):
    """A missing, truncated, foreign or mismatched weights file."""


class StackError(SpecError):
    """A stack of techniques that cannot work (``cached`` on a one-step model; a technique the backbone lacks)."""
