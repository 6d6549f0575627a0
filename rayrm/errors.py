"""The error a user can fix: bad settings, bad input, a missing file or resource.

``rayrm``'s commands print its message and exit with status 2, without a traceback; any other
exception is a bug and keeps its traceback. It subclasses ``ValueError`` so callers that
caught ``ValueError`` before still catch it. Every module raises it (or a subclass:
``ConfigError``, ``ShardError``, ``InvalidEpisodesError``) for what the user must change, with
a message that names the setting, file, episode or key.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad settings or input, said in a message that names what to fix."""
