"""The one exception type for problems a user can cause and fix."""


class SteelsegError(Exception):
    """A bad path, CSV row, RLE string, image or config value.

    The message names the file, row and value; the command line prints it on one line,
    without a traceback, and exits non-zero.
    """


class RLEError(SteelsegError):
    """An EncodedPixels string that is not valid Kaggle run-length encoding."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """Another library's exception as the reason in one of our messages: its type and first
    sentence on one line (torch's run to paragraphs), cut at ``limit`` characters."""
    text = " ".join(str(error).split()).split(". ")[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
