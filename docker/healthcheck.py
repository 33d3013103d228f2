#!/usr/bin/env python3
"""Container health check: exit 0 when the service answers 200 on /readyz, 1 otherwise.

Standard library only, so the image needs no curl or wget. The port comes from CAPEEN_PORT (default 8000);
the check always goes through loopback, whatever CAPEEN_HOST the server binds to. It waits for the answer at
most CAPEEN_HEALTHCHECK_TIMEOUT seconds (default 4: under the compose file's `timeout: 5s`, so that the check
reports why rather than being killed). Optional argument: a full URL to check instead (used by the tests).
"""

from __future__ import annotations

import math
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{os.environ.get('CAPEEN_PORT', '8000')}/readyz"
    setting = os.environ.get("CAPEEN_HEALTHCHECK_TIMEOUT", "4")
    try:
        timeout = float(setting)
    except ValueError:
        timeout = math.nan
    if not 0 < timeout < math.inf:
        print(f"CAPEEN_HEALTHCHECK_TIMEOUT must be a number of seconds above 0, got {setting!r}")
        return 1
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URL)
            status = response.status
    except urllib.error.HTTPError as error:  # 503 while the model is loading or warming up
        print(f"not ready: HTTP {error.code} from {url}")
        return 1
    except (OSError, ValueError) as error:  # refused, timed out, unreachable
        print(f"unhealthy: {error} ({url})")
        return 1
    if status != 200:
        print(f"not ready: HTTP {status} from {url}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
