"""The --help layout every script shares (standard library only: --help stays instant)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except the empty ones: "(default: None)" after a help text that
    already says what happens without the flag only reads as noise."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
