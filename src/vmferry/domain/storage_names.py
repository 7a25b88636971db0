"""Names of pools and volumes: plain file names, nothing a path could be made of.

A volume name becomes a file name in its pool's directory, so it may hold no
``/``, no NUL, not start with ``.`` (no ``.``, ``..`` or hidden files: the
pool keeps its own temporary files under dot names) and be no longer than
:data:`MAX_VOLUME_NAME`. Characters are limited to a portable set so a name
means the same in a shell, a URL and QEMU's option syntax.
"""

from __future__ import annotations

import re

from vmferry.errors import ErrorCode, VmferryError

MAX_VOLUME_NAME = 128
MAX_POOL_NAME = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_+@-][A-Za-z0-9._+@-]*")


def _check(name: object, what: str, limit: int) -> str:
    if not isinstance(name, str) or not name:
        raise VmferryError(ErrorCode.INVALID_ARG, f"{what} name must be a non-empty string")
    if len(name) > limit:
        raise VmferryError(ErrorCode.INVALID_ARG, f"{what} name is longer than {limit} characters")
    if not _NAME_RE.fullmatch(name):
        shown = name.encode("unicode_escape").decode("ascii")
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"invalid {what} name '{shown}': use letters, digits and . _ + @ - only, "
            "not starting with '.' (a plain file name, no '/' or '..')",
        )
    return name


def check_volume_name(name: object) -> str:
    """*name* if it is a valid volume name.

    :raise VmferryError: ``INVALID_ARG`` saying what is wrong.
    """
    return _check(name, "volume", MAX_VOLUME_NAME)


def check_pool_name(name: object) -> str:
    """*name* if it is a valid pool name.

    :raise VmferryError: ``INVALID_ARG`` saying what is wrong.
    """
    return _check(name, "pool", MAX_POOL_NAME)
