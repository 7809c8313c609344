"""Rate limits keyed on the client's real address (issue 9, section 1).

DRF's own ``get_ident`` keys on the whole ``X-Forwarded-For`` header unless ``NUM_PROXIES``
is set, and any client can write that header: a new value per request would be a new
bucket per request. Here the header counts only behind ``TRUSTED_PROXY_COUNT`` proxies,
and only the entry the outermost trusted proxy appended (what it saw as its peer).
"""

from __future__ import annotations

import ipaddress

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle


def client_address(request) -> str:
    """The address the request came from, as far as trusted parties can tell.

    Each trusted proxy appends the address it received the request from, so with N of them
    the client is the N-th entry from the right; anything left of it was written by the
    client. A header with fewer entries did not come through all the proxies: the peer
    address is then the only thing known.
    """
    peer = request.META.get("REMOTE_ADDR", "")
    trusted = settings.TRUSTED_PROXY_COUNT
    if trusted <= 0:
        return peer
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    if len(hops) < trusted:
        return peer
    candidate = hops[-trusted]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return peer  # a proxy that appends something else is misconfigured: key on it
    return candidate


def rate_limit_key(address: str) -> str:
    """One bucket per IPv4 address; per /64 for IPv6, since one host commonly holds a
    whole /64 and could otherwise change its address for every try."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address or "unknown"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is an IPv4 client on a dual stack
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ClientAddressRateThrottle(SimpleRateThrottle):
    """A rate limit per client address (``client_address``); subclasses set ``scope``
    and ``get_rate``."""

    def get_ident(self, request) -> str:
        return rate_limit_key(client_address(request))

    def get_cache_key(self, request, view) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}
