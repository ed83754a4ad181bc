"""``vol -f s3://…`` (and gs://, az://, abfs://): object URLs opened in place for Volatility's FileLayer.

Volatility opens every location through urllib handlers it finds as imported subclasses; schemes it
does not know fail, and schemes it caches are downloaded whole before anything is read.  This handler
serves the object-store schemes with our ranged, cached reader (docs/remote.md) and declares them
uncached, so a 64 GiB ``.vmrs`` is read where it lives: the FileLayer reads its first bytes, and the
saved-state layer opens the same URL through :func:`~volatility3_vmssd.provider.open_saved_state`.

``http(s)://`` stays with Volatility's own handler (it downloads into its cache, as it does for
symbol files); ``vmssd`` commands read HTTP in place.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from volatility3.framework.layers import resources

from ..sources import open_binary, quiet_client_logs

__all__ = ["ObjectStoreHandler"]

OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


class ObjectStoreHandler(resources.VolatilityHandler):
    """urllib handler for object-store URLs: a seekable, read-only reader, never a local copy.

    Volatility's own s3/gs handlers answer in ``default_open`` with an s3fs/gcsfs file (50 MiB blocks,
    a cache of its own): ours answers first (a lower ``handler_order``) so that the file layer and the
    saved-state layer share one reader and one cache of the object.
    """

    handler_order = 400

    @classmethod
    def non_cached_schemes(cls) -> list[str]:
        return list(OBJECT_SCHEMES)

    @staticmethod
    def _open(req: urllib.request.Request) -> Any:
        return open_binary(req.full_url)

    @staticmethod
    def default_open(req: urllib.request.Request) -> Any:
        return open_binary(req.full_url) if req.type in OBJECT_SCHEMES else None

    s3_open = s3a_open = gs_open = gcs_open = az_open = abfs_open = abfss_open = _open


quiet_client_logs()  # vol -vvvv sets the root logger to DEBUG: the clients would print presigned URLs whole
