"""The options that shape remote reads (docs/remote.md), given before the command: ``vmssd --remote-… info URL``.

Credentials are never options: each store's client reads them from its usual places (for S3 the
``AWS_*`` variables, ``AWS_ENDPOINT_URL`` and profiles), so no secret ever sits on a command line.
"""

from __future__ import annotations

import argparse

from .. import sources

MIB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "remote evidence (s3://, gs://, az://, abfs://, http(s)://; credentials from the store's usual sources)"
    )
    d = sources.RemoteOptions()
    group.add_argument(
        "--remote-concurrency", type=int, metavar="N", help=f"ranged requests in flight per object ({d.concurrency})"
    )
    group.add_argument(
        "--remote-part-size", type=int, metavar="MIB", help=f"size of one ranged request for RAM ({d.part_size // MIB})"
    )
    group.add_argument(
        "--remote-readahead", type=int, metavar="MIB", help=f"fetched ahead of forward reads ({d.readahead // MIB})"
    )
    group.add_argument(
        "--remote-cache", type=int, metavar="MIB", help=f"fetched bytes kept per object ({d.cache // MIB})"
    )
    group.add_argument(
        "--remote-retries", type=int, metavar="N", help=f"retries of a throttled, 5xx or broken request ({d.retries})"
    )


def apply(args: argparse.Namespace) -> None:
    """Put the options given into force for this process (``ValueError`` names one out of bounds)."""

    def mib(value: int | None) -> int | None:
        return None if value is None else value * MIB

    sources.quiet_client_logs()
    sources.configure(
        concurrency=getattr(args, "remote_concurrency", None),
        part_size=mib(getattr(args, "remote_part_size", None)),
        readahead=mib(getattr(args, "remote_readahead", None)),
        cache=mib(getattr(args, "remote_cache", None)),
        retries=getattr(args, "remote_retries", None),
    )
