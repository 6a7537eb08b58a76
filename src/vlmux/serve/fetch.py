"""Remote images: which addresses a URL may reach (a pure policy), and a fetch that connects only to an address the
policy allowed (resolved once, so a name cannot change its answer between the check and the connection), with a
timeout, a byte limit and a few redirects, each checked again."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from vlmux.serve.errors import ApiError

# Cloud metadata services: refused even with --allow-private-images, since no image lives there.
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")}
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    timeout: float = 10.0
    max_bytes: int = 20 * 2**20


def refusal(address: str, allow_private: bool) -> str | None:
    """Why an image may not be fetched from `address` (an IP), or None if it may. Opens no connection."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA:
        return f"{ip} is a cloud metadata address"
    if allow_private or ip.is_global:
        return None
    kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private" if ip.is_private
            else "multicast" if ip.is_multicast else "not a public")
    return f"{ip} is a {kind} address (start the server with --allow-private-images to allow it)"


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of `url` (http or https), or ApiError: 400 for a refused or failed fetch, 413 past the byte limit."""
    for _ in range(MAX_REDIRECTS + 1):
        try:  # an unclosed IPv6 bracket or a port past 65535 raises ValueError
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise ApiError(400, f"image URL {url[:200]!r} is malformed: {e}", "invalid_image_url") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(400, f"image URL {url[:200]!r}: only http(s) URLs with a host are fetched", "invalid_image_url")
        address = _resolve(parts.hostname, port, policy.allow_private)
        connection = _Connection(parts.scheme, parts.hostname, address, port, policy.timeout)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"Host": parts.netloc, "User-Agent": "vlmux", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise ApiError(400, f"image URL answered HTTP {response.status}", "image_fetch_failed")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise _too_large(policy.max_bytes)
            body = response.read(policy.max_bytes + 1)
            if len(body) > policy.max_bytes:
                raise _too_large(policy.max_bytes)
            return body
        except (OSError, http.client.HTTPException) as e:
            raise ApiError(400, f"could not fetch the image: {type(e).__name__}: {e}", "image_fetch_failed") from None
        finally:
            connection.close()
    raise ApiError(400, f"image URL redirected more than {MAX_REDIRECTS} times", "image_fetch_failed")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the image is larger than {limit // 2**20} MiB", "image_too_large")


def _resolve(host: str, port: int, allow_private: bool) -> str:
    """One address for `host` that the policy allows; every address it has must be allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ApiError(400, f"image host {host!r} does not resolve: {e}", "image_fetch_failed") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        reason = refusal(address, allow_private)
        if reason is not None:
            raise ApiError(400, f"image URL refused: {host} resolves to {reason}", "image_url_refused")
    return addresses[0]


class _Connection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address resolved beforehand; TLS still checks the certificate for the host name."""

    def __init__(self, scheme: str, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._scheme, self._address = scheme, address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._scheme == "https":
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)
