"""The exceptions of the certs package, so callers can tell bad input from a broken file or API call."""

from __future__ import annotations


class CertError(Exception):
    """Base of every error the certs package raises."""


class InvalidInput(CertError, ValueError):
    """A service, namespace, DNS name, IP address or validity period that cannot go into a certificate."""


class CertFileError(CertError):
    """Certificate or key files are missing, unreadable, unwritable or do not form a matching pair."""


class BootstrapError(CertError):
    """The API server refused or failed a step of storing the certificate or publishing its CA."""
