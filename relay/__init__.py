"""retm-relay: RETM webhooks in, confirmed RabbitMQ publishes out.

The package is one small module per stage of the pipeline: ``settings``, ``logs``, ``auth``,
``ingest``, ``dedup``, ``routing``, ``publish``, ``spool``, ``forward``, ``health``, ``metrics``,
``app``, ``service`` and ``systemd``; RETM's own flows are ``tokens``, ``install``, ``loyalty``
and ``rpc``. ``relay.cli`` is the command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retm-relay")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
