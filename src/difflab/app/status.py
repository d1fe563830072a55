"""What a tab shows under its controls: nothing, or the one-line error the CLI would print."""

from __future__ import annotations

import html

from difflab.errors import DifflabError


def error_line(err: DifflabError) -> str:
    """The line ``difflab`` prints for ``err`` (:func:`difflab.cli.main`), word for word."""
    return f"difflab: error: {str(err).strip()}"


def error_html(err: DifflabError) -> str:
    """:func:`error_line` as the page shows it: escaped, in the tab's status line."""
    return f'<p class="difflab-error" role="alert">{html.escape(error_line(err))}</p>'


def note_html(text: str) -> str:
    """A plain status line (what was drawn, with its settings)."""
    return f'<p class="difflab-note">{html.escape(text)}</p>'
