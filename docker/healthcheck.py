"""Container health checks for docker/compose.yaml, in plain Python (the images have no curl).

    python docker/healthcheck.py tcp HOST PORT      # something accepts connections there
    python docker/healthcheck.py http URL           # answers below 400, as if behind the TLS proxy

The HTTP check sends ``X-Forwarded-Proto: https`` because compose runs the web service
behind a TLS-terminating proxy with SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto; without it
the control plane would redirect the check to HTTPS. Exit status 0 healthy, 1 not.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5


def tcp_ok(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return True
    except OSError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is an answer to judge, not one to follow


def http_ok(url: str) -> bool:
    request = urllib.request.Request(url, headers={"X-Forwarded-Proto": "https"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=TIMEOUT_S) as response:
            return response.status < 400
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "tcp":
        healthy = tcp_ok(argv[1], int(argv[2]))
    elif len(argv) == 2 and argv[0] == "http":
        healthy = http_ok(argv[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
