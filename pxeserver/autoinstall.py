"""Renders a host's kickstart or preseed from the Jinja2 templates in kickstarts/ and preseeds/.

Jinja2's :class:`~jinja2.sandbox.SandboxedEnvironment` is used, with ``StrictUndefined``: a
template that names a variable the host does not have fails loudly instead of writing an empty
string into an installer file, and a template cannot reach Python internals
(``''.__class__.__mro__``) even if someone who may only edit templates tries.

Host and profile values are only ever passed as template *variables*, never pasted into a
template's source, so a hostname or variable holding ``{{ ... }}`` comes out literally (Cobbler's
CVE-2021-40324 came from evaluating such values). Kickstart and preseed files are line-oriented,
so a value holding a line break could still smuggle in a ``%post`` section or a ``d-i`` line:
every value a template writes out is refused if it holds a line break or a NUL.

Within a line, templates quote what they write: ``shquote`` makes a value one word for a
shell (``%post``, ``late_command``) and for a kickstart command line (pykickstart and
anaconda split those with ``shlex``, so ``timezone 'UTC --isUtc'`` stays one argument);
``one_of(...)`` refuses anything but listed words where even a quoted value would be
interpreted (a ``sed`` expression, whose ``e`` flag runs commands).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from pxeserver.config import Config
from pxeserver.policy import AutoinstallKind
from pxeserver.registry import Host, Profile


class UnsafeValue(TemplateError):
    """A value that would add lines to a line-oriented installer file."""


def _single_line(value: Any) -> Any:
    """Jinja2 ``finalize`` hook: runs on every ``{{ ... }}`` output of every template."""
    if isinstance(value, str) and any(ch in value for ch in "\r\n\0"):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise UnsafeValue(f"refusing to write a value with a line break or NUL: {shown!r}")
    return value


def _one_of(value: Any, *allowed: str) -> Any:
    """Jinja2 filter ``one_of("a", "b")``: the value, if it is one of these words."""
    if value not in allowed:
        shown = str(value) if len(str(value)) <= 40 else str(value)[:40] + "..."
        raise UnsafeValue(f"refusing to write {shown!r}: must be one of {', '.join(allowed)}")
    return value


class AutoinstallRenderer:
    """One sandboxed environment per template directory, each caching its compiled templates."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._environments = {
            AutoinstallKind.KICKSTART: self._environment(config.kickstarts_dir),
            AutoinstallKind.PRESEED: self._environment(config.preseeds_dir),
        }

    @staticmethod
    def _environment(directory: Path) -> SandboxedEnvironment:
        environment = SandboxedEnvironment(
            loader=FileSystemLoader(directory),
            undefined=StrictUndefined,
            finalize=_single_line,
            keep_trailing_newline=True,
            autoescape=False,  # installer files, not HTML
        )
        # %post scripts and late_command are shell: values go in as one quoted word.
        environment.filters["shquote"] = lambda value: shlex.quote(str(value))
        environment.filters["one_of"] = _one_of
        return environment

    def variables(self, host: Host, profile: Profile) -> dict[str, Any]:
        """Everything a template sees: host, profile, server URLs and the install-done callback."""
        base = self.config.http_base_url
        return {
            "host": {
                "hostname": host.hostname,
                "shortname": host.hostname.split(".", 1)[0],
                "ip": host.ip or "",
                "mac": str(host.mac),
                "vars": host.vars,
            },
            "profile": {
                "name": profile.name,
                "kernel": profile.kernel,
                "initrd": profile.initrd,
                "vars": profile.vars,
            },
            "server": {
                "address": self.config.advertised_address,
                "http_base_url": base,
                "boot_url": f"{base}/boot",
                "domain": self.config.dns.domain,
            },
            # Host values win over the profile's: one place for "this profile, but this host...".
            "vars": {**profile.vars, **host.vars},
            "callback_url": (
                f"{base}/api/hosts/{host.mac.dashed}/installed?token={host.install_token}"
            ),
        }

    def render(self, kind: AutoinstallKind, host: Host, profile: Profile) -> str:
        """Render the profile's template; raises jinja2.TemplateError (or OSError) on failure."""
        template = self._environments[kind].get_template(profile.autoinstall)
        return template.render(self.variables(host, profile))
