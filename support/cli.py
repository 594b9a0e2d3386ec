"""Command-line helpers shared by the scripts: one-line argparse errors, help layout, flag types."""
import argparse
import math
import textwrap

from models.resnet import blocks_per_stage
from pyhessian_dist import CURVATURES

__all__ = [
    "ArgumentParser",
    "HelpFormatter",
    "add_bool_flag",
    "curvature_list",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "resnet_depth",
    "seed",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default (where there is one worth showing: not None, not False for a
    plain switch) and never wraps a line inside a --flag-name."""

    def _get_help_string(self, action):
        if action.default is None or (action.default is False and action.nargs == 0):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text, width):
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what is wrong> (see --help)``, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_bool_flag(parser, name, default, help):
    """Add ``--name`` / ``--no-name`` (argparse.BooleanOptionalAction) with a default."""
    dest = name.replace("-", "_")
    parser.add_argument(
        f"--{name}", dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help
    )


def _number(kind, check, what):
    """An argparse type: ``kind(text)`` that must pass ``check``; errors say "must be <what>"."""

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, and numpy takes 32 bits:
# larger seeds would overflow torch.manual_seed or alias smaller ones
SEED_LIMIT = 2**32
seed = _number(int, lambda v: 0 <= v < SEED_LIMIT, f"an integer from 0 to {SEED_LIMIT - 1}")


def resnet_depth(text):
    """argparse type: a ResNet depth of the form 6n+2 (20, 32, 44, 56, 110, ...)."""
    try:
        depth = int(text)
        blocks_per_stage(depth)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {text!r}"
        ) from None
    return depth


def curvature_list(text):
    """argparse type: comma-separated curvature names ("hessian", "ggn", "ef"), each once."""
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in CURVATURES:
            raise argparse.ArgumentTypeError(
                f"unknown curvature {name!r} in {text!r}: choose from {', '.join(CURVATURES)} "
                "(hessian: the loss Hessian; ggn: the generalized Gauss-Newton matrix; ef: the "
                "empirical Fisher), comma-separated for several")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice in {text!r}; name "
                                         "each curvature once")
    return names
