"""The one exception type that the command line turns into a one-line message."""


class FedtuneError(Exception):
    """Bad input or configuration: the message names what is wrong (file, row, key)."""
