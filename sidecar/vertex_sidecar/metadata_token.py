"""Access tokens from the GCE / GKE metadata server, without google-auth's import weight.

On GKE with Workload Identity — the common case — ADC resolves to the metadata server, and
fetching a token is one GET. google-auth's compute-engine path imports `requests`,
`urllib3` and `cryptography` (its `jwt` and mTLS helpers) for it: about 15 MB of resident
memory in every pod of the fleet. `use_native_metadata()` says when ADC would land on the
metadata server with nothing special about it; everything else (key files, federation
configs, gcloud's file, mTLS to the metadata server, Agent Identity bound tokens) stays
with google-auth.

Same wire protocol as google-auth: `GET http://$GCE_METADATA_HOST/computeMetadata/v1/
instance/service-accounts/default/token?scopes=...` with `Metadata-Flavor: Google`, and
the answer must carry that header back (anything else is not a metadata server).
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import quote

DEFAULT_HOST = "metadata.google.internal"
TIMEOUT_S = 3.0  # google-auth's default for the metadata server
_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
# google-auth's ADC goes elsewhere (or does more than one GET) when any of these is set.
_NOT_PLAIN_METADATA = ("GOOGLE_APPLICATION_CREDENTIALS", "GCE_METADATA_MTLS_MODE",
                       "GOOGLE_API_CERTIFICATE_CONFIG", "GOOGLE_API_USE_CLIENT_CERTIFICATE")


class MetadataTokenError(Exception):
    """The metadata server did not hand out a token; the message is safe to show."""


def gcloud_adc_file(environ: Mapping[str, str]) -> str:
    """Where gcloud keeps user ADC (`gcloud auth application-default login`)."""
    config_dir = environ.get("CLOUDSDK_CONFIG") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config", "gcloud")
    return os.path.join(config_dir, "application_default_credentials.json")


def use_native_metadata(environ: Mapping[str, str]) -> bool:
    """True when google-auth's ADC would ask the metadata server for a plain token."""
    if any(environ.get(name) for name in _NOT_PLAIN_METADATA):
        return False
    return not os.path.exists(gcloud_adc_file(environ))


def metadata_host(environ: Mapping[str, str]) -> str:
    return environ.get("GCE_METADATA_HOST") or environ.get("GCE_METADATA_ROOT") or DEFAULT_HOST


def parse_token_response(status: int, flavor: str | None, body: bytes, now: datetime.datetime,
                         host: str) -> tuple[str, datetime.datetime]:
    """(token, expiry) from the metadata server's answer; raises MetadataTokenError."""
    if flavor != "Google":
        raise MetadataTokenError(f"{host} answered without `Metadata-Flavor: Google` (status {status}): "
                                 "not a metadata server")
    if status != 200:
        detail = body[:200].decode("utf-8", "replace").strip()
        raise MetadataTokenError(f"the metadata server at {host} answered {status} for the token: {detail}")
    try:
        answer: Any = json.loads(body)
        token, expires_in = answer["access_token"], float(answer["expires_in"])
    except (ValueError, KeyError, TypeError):
        raise MetadataTokenError(f"the metadata server at {host} answered a token response without "
                                 "access_token/expires_in") from None
    if not isinstance(token, str) or not token:
        raise MetadataTokenError(f"the metadata server at {host} answered an empty token")
    return token, now + datetime.timedelta(seconds=expires_in)


@dataclass
class MetadataServerCredentials:
    """The part of google-auth's credentials interface `TokenSource` uses: `refresh()`,
    `token`, `expiry` (naive UTC, as google-auth keeps it) and `service_account_email`."""

    scopes: Sequence[str]
    host: str
    token: str | None = None
    expiry: datetime.datetime | None = None
    service_account_email: str = "default"

    @classmethod
    def from_environ(cls, scopes: Sequence[str], environ: Mapping[str, str]) -> "MetadataServerCredentials":
        return cls(scopes=list(scopes), host=metadata_host(environ))

    def refresh(self, _request: object = None) -> None:
        """Blocking, like google-auth's refresh (the token source runs it in a thread)."""
        path = _TOKEN_PATH + (f"?scopes={quote(','.join(self.scopes), safe=',')}" if self.scopes else "")
        connection = http.client.HTTPConnection(self.host, timeout=TIMEOUT_S)
        try:
            connection.request("GET", path, headers={"Metadata-Flavor": "Google"})
            response = connection.getresponse()
            body = response.read(64 * 1024)
            status, flavor = response.status, response.getheader("Metadata-Flavor")
        except (OSError, http.client.HTTPException) as exc:
            raise MetadataTokenError(f"the metadata server at {self.host} did not answer ({exc}); "
                                     "no other Application Default Credentials were found "
                                     "(GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC file)") from None
        finally:
            connection.close()
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        self.token, self.expiry = parse_token_response(status, flavor, body, now, self.host)
