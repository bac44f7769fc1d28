"""The one exception type for problems a user can cause and fix."""


class SteelsegError(Exception):
    """A bad path, CSV row, RLE string, image or config value.

    The message names the file, row and value; the command line prints it on one line,
    without a traceback, and exits non-zero.
    """


class RLEError(SteelsegError):
    """An EncodedPixels string that is not valid Kaggle run-length encoding."""
