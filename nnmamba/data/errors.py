"""The one exception type raised for bad input data.

Every reader, validator and preprocessing step raises :class:`DataError` with a
message that names the case, the file and the problem, so a researcher with a
thousand-case dataset knows which file to fix without a debugger. It subclasses
``ValueError`` because bad data is a bad value handed to the pipeline.
"""

from __future__ import annotations


class DataError(ValueError):
    """A raw or preprocessed dataset is missing, unreadable or inconsistent."""
