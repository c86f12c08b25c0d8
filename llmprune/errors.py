"""One exception type for every user-facing failure, so the CLI can print one line and exit."""


class LLMPruneError(Exception):
    """A problem the user can fix; the message names the thing and the fix."""
