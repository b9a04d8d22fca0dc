"""What the subcommands of `sae-analyze` share: how one is declared, and the latent-list syntax."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sae.typed_config import ConfigError, add_arguments, from_args


@dataclass(frozen=True)
class Subcommand:
    """An analysis on the command line: its options dataclass (every field an option, see
    `sae.typed_config.option`) and the function that runs it on a built instance."""

    options: type
    run: Callable[[Any], int]
    help: str

    def add_parser(self, subparsers: argparse._SubParsersAction, name: str) -> None:
        parser = subparsers.add_parser(
            name, help=self.help, description=self.help, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add_arguments(parser, self.options)

    def __call__(self, args: argparse.Namespace, prog: str) -> int:
        return self.run(from_args(self.options, args, prog))


def parse_latents(spec: str) -> list[int]:
    """'0:200' (start:stop, stop excluded), '3,7,10-12' (ranges inclusive) or a mix; each latent once,
    in order of first mention."""
    latents: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                start, stop = part.split(":")
                latents.extend(range(int(start), int(stop)))
            elif "-" in part.lstrip("-"):
                low, high = part.split("-")
                latents.extend(range(int(low), int(high) + 1))
            else:
                latents.append(int(part))
        except ValueError:
            raise ConfigError(f"--latents {spec!r}: expected e.g. 0:200 or 3,7,10-12") from None
    if not latents:
        raise ConfigError(f"--latents {spec!r} selects no latents")
    return list(dict.fromkeys(latents))


def exclusive(options: Any, *names: str) -> None:
    """Raise unless at most one of the options `names` is set (not None, not empty)."""
    given = [n for n in names if getattr(options, n) not in (None, [], ())]
    if len(given) > 1:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ConfigError(f"{flags}: give one of them, not several")
