"""The one exception type users see: its message names the problem and is shown as is."""


class MergeError(ValueError):
    """Bad input or an impossible merge, with a message meant for the user (no traceback)."""
