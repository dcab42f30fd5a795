"""The one exception type anelab raises for bad input."""


class AnelabError(ValueError):
    """Bad input: the message says what was wrong and what is allowed.

    A subclass of ``ValueError`` so ``except ValueError`` keeps working.
    """
