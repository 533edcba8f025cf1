"""The doors, as notebook servers keep them: who may talk to the app and which browser requests
may change anything.

Every request (HTTP and the WebSocket's upgrade) goes through ``check_request``, in this order:

1. **Host.** The ``Host`` header must name the loopback (``localhost``, ``127.0.0.1``,
   ``[::1]``, any port), the bound host (``BIND_HOST``) or one of ``ALLOWED_HOSTS``; bound to a
   wildcard (``0.0.0.0``, ``::``) also an IP address or this machine's name. A DNS-rebinding
   page sends its own domain name, so it gets 403.
2. **Token.** With ``TOKEN`` set (``run.py`` sets one whenever it listens off the loopback),
   a request needs ``Authorization: Bearer <token>``, the cookie a browser got from
   ``?token=<token>`` (``HttpOnly``, ``SameSite=Strict``, its value an HMAC of the token, not
   the token; the page then redirects to the URL without the token), or ``?token=`` itself;
   else 401. Compared in constant time.
3. **Same origin.** A state-changing request (POST, PUT, PATCH, DELETE) whose ``Origin`` (or,
   without one, ``Referer``) is another origin, or that says ``Sec-Fetch-Site: cross-site``,
   gets 403; so does a WebSocket upgrade with a foreign ``Origin``.
4. **CSRF token.** A state-changing request from a browser (it carries ``Origin``, ``Referer``,
   a ``Sec-Fetch-*`` header or one of our cookies) needs the page's CSRF token in the
   ``X-CSRF-Token`` header (htmx sends it on every request, ``hx-headers`` in base.html) or in
   the form field ``csrf_token``; else 403. Programs on the loopback (curl, no such headers)
   need none.

Every answer also forbids framing by other sites (``FRAMING_HEADERS``).

The CSRF token is an HMAC of a per-data-dir secret (``<data dir>/secret_key``, created once,
mode 0600), which is also Flask's ``SECRET_KEY``.

Config keys (``create_app({...})``, or ``SAE_STUDIO_<KEY>`` in the environment):
``BIND_HOST`` (default ``127.0.0.1``), ``ALLOWED_HOSTS`` (a list, or a comma-separated string),
``TOKEN`` (None: no token needed).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import Flask, Response, current_app, redirect, request
from flask.typing import ResponseReturnValue
from markupsafe import Markup, escape
from werkzeug.exceptions import RequestEntityTooLarge

from worker import jobs

from . import error_response, render

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BROWSER_HEADERS = ("Origin", "Referer", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest")
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SECRET_FILE = "secret_key"


class TooLarge(jobs.JobError):
    """An upload (or any request body) over ``MAX_CONTENT_LENGTH``."""

    status = 413


@dataclass(frozen=True)
class Doors:
    """What ``check_request`` lets in, fixed when the app is built."""

    hosts: frozenset[str]
    """Allowed ``Host`` names, lower case, without port (IPv6 in brackets)."""
    any_ip: bool
    """Bound to a wildcard address: any IP literal is an allowed ``Host`` too."""
    token: str | None
    """The access token; None: none needed."""
    csrf: str
    """The CSRF token the pages carry."""
    cookie: str = ""
    """The value of the cookie a browser gets for the token: an HMAC of it under the data
    folder's secret, never the token itself (a browser sends a host's cookies to every port of
    that host, so another server there sees it; it opens this app, but it is not the token,
    which also works as a Bearer header and in links)."""


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (``127.x.x.x``, ``::1``, bracketed or not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """A ``Host`` header's name without the port, lower case: ``[::1]:5000`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def load_secret(data_dir: Path) -> str:
    """The data dir's secret (64 hex digits), created once with mode 0600: written to a
    temporary file and linked into place, so concurrent first starts agree on one."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    return path.read_text().strip()


def _hosts(config: dict[str, Any]) -> list[str]:
    raw = config.get("ALLOWED_HOSTS") or []
    if isinstance(raw, str):
        raw = re.split(r"[,\s]+", raw)
    return [host_name(str(h)) for h in raw if str(h).strip()]


def doors_for(config: dict[str, Any], secret: str) -> Doors:
    """The doors an app's config asks for (module docstring)."""
    bind = host_name(str(config.get("BIND_HOST") or "127.0.0.1"))
    if ":" in bind and not bind.startswith("["):
        bind = f"[{bind}]"  # a bare IPv6 address, as a Host header writes it
    hosts = set(LOOPBACK_NAMES) | set(_hosts(config))
    wildcard = bind in WILDCARDS
    if wildcard:
        hosts |= {host_name(socket.gethostname()), host_name(socket.getfqdn())}
    else:
        hosts.add(bind)
    token = str(config["TOKEN"]) if config.get("TOKEN") else None
    csrf = hmac.new(secret.encode(), b"sae-studio csrf", hashlib.sha256).hexdigest()
    cookie = hmac.new(secret.encode(), f"sae-studio cookie {token}".encode(),
                      hashlib.sha256).hexdigest() if token else ""
    return Doors(frozenset(hosts), wildcard, token, csrf, cookie)


def init_app(app: Flask) -> None:
    """Load the secret, fix the doors, and check every request; ``csrf_token()`` and
    ``csrf_field()`` for the templates; 413 answered with a sentence."""
    secret = load_secret(Path(app.config["DATA_DIR"]))
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = secret
    doors = doors_for(app.config, secret)
    app.extensions["sae_studio_doors"] = doors
    app.before_request(check_request)
    app.jinja_env.globals["csrf_token"] = lambda: doors.csrf
    app.jinja_env.globals["csrf_field"] = lambda: Markup(
        f'<input type="hidden" name="{CSRF_FIELD}" value="{doors.csrf}">')
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    app.after_request(_framing)


FRAMING_HEADERS = {"X-Frame-Options": "DENY",
                   "Content-Security-Policy": "frame-ancestors 'none'",
                   "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "same-origin"}
"""On every answer: no other site may show our pages in a frame (a framed page is our own
origin, CSRF token and all, so a click lured onto its buttons would act), no type sniffing,
and no URL of ours in the Referer sent to other sites."""


def _framing(response: Response) -> Response:
    for name, value in FRAMING_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _too_large(_exc: RequestEntityTooLarge) -> ResponseReturnValue:
    limit = current_app.config.get("MAX_CONTENT_LENGTH") or 0
    field_limit = current_app.config.get("MAX_FORM_MEMORY_SIZE") or 0
    upload = (f"the limit is {limit / 2**20:,.0f} MiB for the whole request (run.py "
              "--max-upload-mb)")
    if request.content_length is None:  # chunked: which limit it reached is not known
        msg = (f"The request is too large: {upload}, and {field_limit / 1000:,.0f} kB for a "
               "form field other than a file.")
    elif limit and request.content_length > limit:
        msg = f"The upload is too large: {upload}."
    else:  # one form field over Flask's MAX_FORM_MEMORY_SIZE
        msg = f"A form field is too long: the limit is {field_limit / 1000:,.0f} kB."
    return error_response(TooLarge(msg, {"file": msg}))


def _refuse(status: int, message: str) -> Response:
    """403/401 with a sentence: JSON for JSON clients and the WebSocket, else a short page."""
    if render.wants_json() or request.path.startswith("/ws/"):
        return render.json_response({"error": message}, status)
    title = "Access token needed" if status == 401 else "Refused"
    html = (f"<!doctype html><html lang=en><meta charset=utf-8><title>{title} · SAE Studio"
            f"</title><h1>{title}</h1><p>{escape(message)}</p></html>")
    return Response(html, status, mimetype="text/html")


def _cookie_name() -> str:
    """Per host and port, so two apps on one machine keep their own cookie."""
    return "sae_studio_token_" + re.sub(r"[^a-z0-9]", "_", request.host.lower())


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _token_answer(doors: Doors) -> ResponseReturnValue | None:
    """None when the request carries the access token; a redirect that sets the cookie when
    a browser brought it as ``?token=``; else 401."""
    assert doors.token is not None
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer " and _same(auth[7:].strip(), doors.token):
        return None
    if _same(request.cookies.get(_cookie_name(), ""), doors.cookie):
        return None
    given = request.args.get("token")
    if given is not None and _same(given, doors.token):
        if request.method != "GET" or request.path.startswith("/ws/"):
            return None
        rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
        resp = redirect(request.path + (f"?{urlencode(rest)}" if rest else ""), 303)
        resp.set_cookie(_cookie_name(), doors.cookie, httponly=True, samesite="Strict",
                        secure=request.is_secure)
        return resp
    return _refuse(401, "SAE Studio needs its access token: open the URL that run.py printed "
                        "(it ends in ?token=...), or send 'Authorization: Bearer <token>'.")


def _foreign_origin() -> str | None:
    """The other origin a request came from (``Origin``, else ``Referer``), or None."""
    own = f"{request.scheme}://{request.host}".lower()
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if not referer:
            return None
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return None if origin.lower() == own else origin


def _is_browser() -> bool:
    if any(h in request.headers for h in BROWSER_HEADERS):
        return True
    return any(name == "session" or name.startswith("sae_studio_token_")
               for name in request.cookies)


def check_request() -> ResponseReturnValue | None:
    """The doors, in order (module docstring); None lets the request through."""
    doors: Doors = current_app.extensions["sae_studio_doors"]
    name = host_name(request.host)
    if name not in doors.hosts and not (doors.any_ip and _is_ip(name)):
        return _refuse(403, f"Host '{name}' is not allowed: open SAE Studio as localhost or "
                            f"127.0.0.1, or start run.py with --allowed-host {name}.")
    if doors.token is not None:
        answer = _token_answer(doors)
        if answer is not None:
            return answer
    is_ws = request.path.startswith("/ws/")
    if request.method not in STATE_CHANGING and not is_ws:
        return None
    foreign = _foreign_origin()
    if foreign is not None or request.headers.get("Sec-Fetch-Site") == "cross-site":
        return _refuse(403, f"Refused a request from another site ({foreign or 'cross-site'}): "
                            "only SAE Studio's own pages may change it.")
    if is_ws or not _is_browser():
        return None
    given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    if not _same(given, doors.csrf):
        return _refuse(403, "The page's security token is missing or out of date: reload the "
                            "page and try again.")
    return None
