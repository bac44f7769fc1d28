"""Paths a user gives: local or mounted (NFS) folders and files. Object-store URIs are refused
in one line until runs and data can live there."""

import os
from pathlib import Path
from urllib.parse import urlsplit

from steelseg.errors import SteelsegError


def uri_scheme(value: str | os.PathLike) -> str:
    """``s3`` for ``s3://bucket/key``; empty for a plain path."""
    text = str(value)
    return urlsplit(text).scheme if "://" in text else ""


def local_path(value: str | os.PathLike, what: str) -> Path:
    """``value`` as a local path (``~`` expanded).

    Raises:
        SteelsegError: ``value`` is a URI such as ``s3://bucket/runs``; the message names
            ``what`` and the URI without any credentials or query.
    """
    scheme = uri_scheme(value)
    if scheme:
        parts = urlsplit(str(value))
        shown = f"{scheme}://{parts.hostname or ''}{parts.path}"
        raise SteelsegError(
            f"{what} {shown}: {scheme}:// URIs are not supported yet; use a local or "
            "shared-filesystem path"
        )
    return Path(os.path.expanduser(value))
