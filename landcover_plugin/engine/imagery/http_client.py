"""Polite HTTP for tile and map servers: keep-alive, a per-host rate limit,
retries with exponential back-off and jitter that honour Retry-After.

One retry loop of our own (not urllib3's) so that every retry is counted for
the run report, every wait goes through the rate limit, and a cancelled run
stops waiting at once.
"""
from __future__ import annotations

import email.utils
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from ...contract.names import HEADERS_ENV
from ..errors import EngineError

USER_AGENT = "landcover-plugin/0.2 (+https://github.com/landcover-plugin; QGIS land cover plugin)"
TIMEOUT = (5.0, 30.0)  # seconds to connect, seconds between bytes
# Seconds of waiting for one URL's answers over all its tries (not counting the waits between
# tries): TIMEOUT's read limit restarts at every byte, so a server sending a byte now and
# then would hold a worker for hours. A tile takes well under a second; a 512-px WMS image
# at 1 Mbit/s about 5 s.
DEADLINE = 60.0
READ_CHUNK = 64 * 1024
ATTEMPTS = 6  # tries per URL for 5xx/429, broken connections and bodies that do not validate
BACKOFF_BASE = 0.2  # seconds; the n-th retry waits up to BACKOFF_BASE * 2**n ("full jitter")
BACKOFF_CAP = 10.0
RETRY_AFTER_CAP = 60.0  # a server asking for longer is treated as refusing
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MISSING_STATUS = frozenset({204, 404})


class Unreachable(Exception):
    """Connection refused, unknown host or connect timeout: the server is not there."""


class DeadlinePassed(Exception):
    """The answer was not in whole by the deadline."""


@dataclass
class Download:
    body: bytes | None
    status: str  # "ok", "missing" (404/204) or "failed"
    retries: int = 0
    error: str = ""
    value: object = None  # what `validate` returned for the body
    broken: bool = False  # the last try's body did not validate (cut short, not an image ...)


def host_of(url: str) -> str:
    """host[:port] of a URL, for messages and rate limits: never the path or query, which may hold API keys."""
    parts = urlsplit(url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else "?"


class RateLimiter:
    """At most `rate` requests per second to each host, spaced evenly (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str, stop: threading.Event) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(host, 0.0))
            self._next[host] = slot + self.interval
        if slot > now:
            stop.wait(slot - now)


class HostBoundSession(requests.Session):
    """A session whose user-given headers go only to the host they were given for.

    They are how users pass credentials (API keys, tokens, cookies), under any
    name; requests drops only Authorization when a redirect leads to another
    host (or port, or from https to http), so a tile server answering 302 to a
    CDN would hand it the key. The same rule as requests' own for Authorization."""

    user_headers: frozenset[str] = frozenset()

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        super().rebuild_auth(prepared_request, response)
        if self.should_strip_auth(response.request.url, prepared_request.url):
            for name in self.user_headers:
                prepared_request.headers.pop(name, None)  # case-insensitive, like HTTP header names


def make_session(headers: dict[str, str], pool_size: int) -> requests.Session:
    """A keep-alive session with a connection pool as large as the worker count;
    `headers` are sent to the source's host only, never after a redirect elsewhere."""
    adapter = HTTPAdapter(max_retries=0, pool_connections=4, pool_maxsize=max(pool_size, 1))
    session = HostBoundSession()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": USER_AGENT, **headers})
    session.user_headers = frozenset(headers)
    return session


def backoff(retry: int, rng: random.Random = random.Random()) -> float:
    """Seconds before retry number `retry` (0-based): random up to an exponential cap,
    so that many clients (or workers) do not retry in lockstep."""
    return rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** retry))


def retry_after(response: requests.Response) -> float | None:
    """The Retry-After header in seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _unreachable(exc: requests.ConnectionError) -> bool:
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectTimeout) or isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def read_body(response: requests.Response, deadline: float) -> bytes:
    """The whole body of a streamed response; DeadlinePassed once time.monotonic()
    passes `deadline`. read1 returns what has arrived rather than waiting for a
    full chunk, so the clock is looked at however slowly the bytes come."""
    chunks = []
    while chunk := response.raw.read1(READ_CHUNK, decode_content=True):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise DeadlinePassed
    return b"".join(chunks)


def get(session: requests.Session, url: str, validate: Callable[[bytes], object],
        limiter: RateLimiter, stop: threading.Event, deadline: float = DEADLINE) -> Download:
    """GET `url` until `validate(body)` accepts a 200 answer (it raises ValueError
    on a bad body: truncated, garbage, wrong size), retrying transient failures
    while the answers have taken less than `deadline` seconds in all.
    Raises Unreachable when the server cannot be connected to at all."""
    host, retries, error, spent = host_of(url), 0, "", 0.0
    for attempt in range(ATTEMPTS):
        if attempt:
            retries += 1
        if stop.is_set():
            return Download(None, "failed", retries, "stopped")
        limiter.wait(host, stop)
        wait, broken, started = None, False, time.monotonic()
        try:
            with session.get(url, timeout=TIMEOUT, stream=True) as response:
                body = read_body(response, started + deadline - spent)
        except requests.ConnectionError as exc:
            if _unreachable(exc):
                raise Unreachable(host) from None
            error = type(exc).__name__  # not str(exc): it holds the URL, maybe with a key
        except requests.RequestException as exc:  # read timeout
            error = type(exc).__name__
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # from read_body: body cut short, read timeout
            error = type(exc).__name__
        except DeadlinePassed:
            pass  # given up just below
        else:
            if response.status_code in MISSING_STATUS:
                return Download(None, "missing", retries)
            if response.status_code == 200:
                try:
                    return Download(body, "ok", retries, value=validate(body))
                except ValueError as exc:
                    error, broken = str(exc), True
            elif response.status_code in RETRY_STATUS:
                error = f"HTTP {response.status_code}"
                wait = retry_after(response) if response.status_code in (429, 503) else None
                if wait is not None and wait > RETRY_AFTER_CAP:
                    return Download(None, "failed", retries, f"{error}, Retry-After {wait:.0f} s")
            else:  # 401, 403, ...: asking again will not help
                return Download(None, "failed", retries, f"HTTP {response.status_code}")
        spent += time.monotonic() - started
        if spent >= deadline:
            return Download(None, "failed", retries, f"no complete answer within {deadline:g} s")
        if attempt + 1 < ATTEMPTS:
            stop.wait(wait if wait is not None else backoff(attempt))
    return Download(None, "failed", retries, error, broken=broken)


# --- the user's headers ---------------------------------------------------------------------------


def env_headers() -> dict[str, str]:
    """Extra HTTP headers from the environment (a JSON object): how the plugin hands
    over credentials from QGIS's authentication database without a file or a command line."""
    import json
    import os

    text = os.environ.get(HEADERS_ENV, "")
    if not text:
        return {}
    try:
        headers = json.loads(text)
    except ValueError:
        headers = None
    if not isinstance(headers, dict):
        raise EngineError("BAD_HEADERS", f"{HEADERS_ENV} is not a JSON object of header names and values.",
                          'Set it like {"Authorization": "Basic ..."}.')
    return {str(k): str(v) for k, v in headers.items()}


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than tab


def request_headers(given: dict[str, str]) -> dict[str, str]:
    """The user's headers (--header or a pipeline's imagery.headers, then $LANDCOVER_HTTP_HEADERS),
    checked before any request: one a request cannot carry used to fail every tile, reported as
    a server failure, or crash. Messages name the header, never its value (often a secret)."""
    headers = {str(k): str(v).strip(" \t") for k, v in {**given, **env_headers()}.items()}
    hint = f"Correct it where it was given: --header, the pipeline's imagery.headers or {HEADERS_ENV}."
    for name, value in headers.items():
        if not HEADER_NAME.fullmatch(name):
            raise EngineError("BAD_HEADERS", f"HTTP header name {name!r} is not a valid header name "
                              "(letters, digits and - only, as a rule).", hint)
        if HEADER_VALUE_BAD.search(value):
            raise EngineError("BAD_HEADERS", f"The value of HTTP header {name} holds a line break or another "
                              "control character (the value is not shown: it may be a secret).",
                              "Give the value on one line. " + hint)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise EngineError("BAD_HEADERS", f"The value of HTTP header {name} holds characters HTTP headers "
                              "cannot carry (the value is not shown: it may be a secret).",
                              "Use the value's ASCII form (e.g. Base64 or percent-encoded, as the server "
                              "expects). " + hint) from None
    return headers
