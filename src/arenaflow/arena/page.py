"""The arena page (static/arena.html) and the headers it is served with.

The page may run only its own script and style (allowed by their SHA-256 in the
Content-Security-Policy; the per-request config is a JSON data block, which browsers never run),
talk only to this server, and not be framed (clickjacking a vote).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
_STYLE = re.compile(r"<style>(.*?)</style>", re.S)


def page_security_headers(csp: str) -> dict[str, str]:
    """`X-Frame-Options` for browsers without `frame-ancestors`."""
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


@functools.cache
def page_html() -> tuple[str, str]:
    """The page and its Content-Security-Policy."""
    html = resources.files("arenaflow.arena").joinpath("static/arena.html").read_text("utf-8")
    scripts, styles = _SCRIPT.findall(html), _STYLE.findall(html)
    if len(scripts) != 1 or len(styles) != 1:
        raise RuntimeError("arena.html must hold exactly one <script> and one <style> element")
    policy = {
        "default-src": "'none'",
        "script-src": _csp_hash(scripts[0]),
        "style-src": _csp_hash(styles[0]),
        "connect-src": "'self'",
        "img-src": "'self'",
        "form-action": "'self'",
        "base-uri": "'none'",
        "frame-ancestors": "'none'",
    }
    return html, "; ".join(f"{k} {v}" for k, v in policy.items())


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"
