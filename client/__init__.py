"""The HTTP client of HawAda (httpx only): `HawadaClient`, `AsyncHawadaClient` and their errors.

from hawada.client import HawadaClient, HawadaAPIError, HawadaConnectionError
"""

from hawada.client.client import (
    AsyncHawadaClient,
    ChecksumError,
    HawadaAPIError,
    HawadaClient,
    HawadaClientError,
    HawadaConnectionError,
)

__all__ = [
    "AsyncHawadaClient",
    "ChecksumError",
    "HawadaAPIError",
    "HawadaClient",
    "HawadaClientError",
    "HawadaConnectionError",
]
