"""What the three command-line scripts share, standard library only (checked before torch is imported):
their argument parser (no abbreviations, a one-line error with "did you mean" for a mistyped option),
their help layout (each default said once), where the repository is (its configs and default files are
found from any folder) and the command line that runs a script from the current folder.
"""
import argparse
import difflib
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the repository: utils/ is one of its folders


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples kept as written; an option's default is added to its help once, only
    where the help does not already say it and the default is a value (not None or False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {shown})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations of long options, whose errors are two lines: what is wrong (with the
    options closest to a mistyped one) and where the help is; exit status 2. ``forwarded_options``: the
    options of another script that this one passes on (suggested for a mistyped option too)."""

    def __init__(self, *args, forwarded_options=(), **kwargs):
        self.forwarded_options = tuple(forwarded_options)
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}{self._suggestion(message)}\n"
              f"{self.prog}: see --help for every option", file=sys.stderr)
        sys.exit(2)

    def _suggestion(self, message):
        """'; did you mean --x?' for the first unknown option of an 'unrecognized arguments' message."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        unknown = next((w for w in message.split(":", 1)[1].split() if w.startswith("-")), None)
        if unknown is None:
            return ""
        options = [s for a in self._actions for s in a.option_strings] + list(self.forwarded_options)
        return did_you_mean(unknown.split("=", 1)[0], options)


def did_you_mean(word, choices):
    """'; did you mean --a or --b?' naming the choices that start with ``word`` or resemble it, or ''."""
    close = [c for c in choices if c.startswith(word) and len(word) > 2]
    close += [c for c in difflib.get_close_matches(word, choices, n=3, cutoff=0.6) if c not in close]
    return f"; did you mean {' or '.join(close[:3])}?" if close else ""


def parse_panel(text):
    """'4:9' -> (4, 9): a 0-based (layer, head) pair, as panel titles show it ('layer 4 head 9')."""
    try:
        layer, head = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"panel {text!r} is not LAYER:HEAD with 0-based ints, e.g. 4:9") from None
    if layer < 0 or head < 0:
        raise argparse.ArgumentTypeError(f"panel {text!r}: layer and head must be >= 0")
    return layer, head


def repo_file(path):
    """``path`` as given where it exists (relative to the current folder), else, for a relative path that
    names a file of the repository (configs/tiny.yaml), that file; else as given (the caller reports it)."""
    given = Path(path)
    if given.exists() or given.is_absolute() or not (REPO / given).exists():
        return str(path)
    return str(REPO / given)


def command(script, *args):
    """The shell command that runs ``experiments/<script>`` with ``args`` from the current folder."""
    where = os.path.relpath(REPO / "experiments" / script)
    if where.startswith(".."):  # from outside the repository: its absolute path
        where = str(REPO / "experiments" / script)
    return shlex.join(["python", where, *map(str, args)])
