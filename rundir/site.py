"""Site defaults: a file of cluster facts (partition, account, QoS, setup lines, ...)
that every run config on this cluster would otherwise repeat, and the provenance of
each resolved value.

Precedence, lowest first: the schema's default < the site file < the run config <
`--set`.  The site file is `$FM9G_LAUNCH_SITE`, else
`$XDG_CONFIG_HOME/fm9g-launch/site.yaml` (`~/.config/...` when XDG_CONFIG_HOME is unset).
`FM9G_LAUNCH_SITE` set but empty means "no site file" (the test suite sets it so a
user's own file never leaks into a test); set to a path that does not exist it is an
error, since a silently ignored typo would drop the site's partition and account.

The site file is read only when a run is launched from a config: the run's
`config.yaml` holds the resolved values, and `resume`, the node agents and the viewers
read that file alone, so editing the site file never changes a run already started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fm9g.rundir import config as config_mod
from fm9g.rundir.config import ConfigError, RunConfig

SITE_ENV = "FM9G_LAUNCH_SITE"

# What a site file may set: facts about the cluster and how to supervise on it.  The
# model, data, train and pipeline sections describe one run's experiment: a site-wide
# default there would change results without appearing in the run config a colleague
# reads, so they are refused.  `executor` is here because the site knows whether it
# has Slurm; `rendezvous` because its port and timeouts follow the site's firewall and
# queue, not the experiment.
SITE_KEYS = ("executor", "run_root", "cluster", "rendezvous", "supervise")

OriginKind = Literal["default", "site file", "run config", "--set"]


@dataclass(frozen=True)
class Origin:
    """Where one resolved value came from."""

    kind: OriginKind
    path: str | None = None  # the file, for "site file" and "run config"


def default_site_path(environ: Mapping[str, str]) -> Path:
    """The per-user site file looked for when FM9G_LAUNCH_SITE is unset."""
    config_home = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "fm9g-launch" / "site.yaml"


def site_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The site file in force, or None; an FM9G_LAUNCH_SITE naming no file is an error."""
    env = os.environ if environ is None else environ
    value = env.get(SITE_ENV)
    if value is not None:
        if not value.strip():
            return None  # explicitly off
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{SITE_ENV}={value}: no such site file; point it at a YAML file of site defaults "
                f"(sections {', '.join(SITE_KEYS)}), or set {SITE_ENV}= (empty) for none"
            )
        return path
    path = default_site_path(env)
    return path if path.is_file() else None


def read_site(path: Path) -> dict[str, Any]:
    """The site file's mapping, checked with the run config's schema and strictness."""
    try:
        raw = config_mod.read_file(path)
    except ConfigError as exc:
        raise ConfigError(f"site file {exc}") from None
    known = set(RunConfig.model_fields)
    for key in raw:
        if key in known and key not in SITE_KEYS:
            raise ConfigError(
                f"site file {path}: section '{key}' describes one run, not the site; move it to the run "
                f"config (a site file may set: {', '.join(SITE_KEYS)})"
            )
    # Validated alone first, so an unknown or mistyped field is blamed on the site file
    # even when a run config would have overridden it.
    config_mod.validate(raw, f"site file {path}")
    return raw


@dataclass(frozen=True)
class Layered:
    """A run config resolved over the site defaults, with what each layer set."""

    config: RunConfig
    name: str
    site: Path | None
    source: Path | None  # the run config file
    site_raw: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    site_note: str = ""  # one line for the plan and the launch output: which site file applied

    def provenance(self) -> dict[str, tuple[Any, Origin]]:
        """Every field, dotted, to (resolved value, where it came from)."""
        run_raw = config_mod.read_file(self.source) if self.source else {}
        set_raw = config_mod.apply_overrides({}, list(self.overrides))
        values = self.config.model_dump(mode="json")
        result: dict[str, tuple[Any, Origin]] = {}
        for dotted in config_mod._all_field_paths():
            keys = dotted.split(".")
            if _sets(set_raw, keys):
                origin = Origin("--set")
            elif _sets(run_raw, keys):
                origin = Origin("run config", str(self.source))
            elif _sets(self.site_raw, keys):
                origin = Origin("site file", str(self.site))
            else:
                origin = Origin("default")
            result[dotted] = (_value(values, keys), origin)
        return result


def _sets(raw: Any, keys: list[str]) -> bool:
    """Whether a raw layer writes the field at `keys` (itself, or a whole section above it)."""
    node = raw
    for key in keys:
        if not isinstance(node, dict):
            return True  # the layer set a section above this field to a value
        if key not in node:
            return False
        node = node[key]
    return True


def _value(values: dict[str, Any], keys: list[str]) -> Any:
    node: Any = values
    for key in keys:
        node = node[key]
    return node


def load(
    path: str | Path | None, overrides: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> Layered:
    """Resolve a run config over the site file in force: default < site < file < --set."""
    site = site_path(environ)
    site_raw = read_site(site) if site else {}
    config, name = config_mod.load(path, overrides, base=site_raw)
    return Layered(
        config=config,
        name=name,
        site=site,
        source=Path(path) if path else None,
        site_raw=site_raw,
        overrides=tuple(overrides or ()),
        site_note=describe_site(site, os.environ if environ is None else environ),
    )


def describe_site(site: Path | None, environ: Mapping[str, str]) -> str:
    """'site defaults: PATH', or why there are none."""
    if site is not None:
        return f"site defaults: {site}"
    if environ.get(SITE_ENV) is not None:
        return f"site defaults: none ({SITE_ENV} is empty)"
    return f"site defaults: none (no {default_site_path(environ)}; {SITE_ENV} names another file)"
