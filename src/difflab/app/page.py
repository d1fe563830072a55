"""The page: the tabs side by side (:data:`TABS`), as one ``gr.Blocks``, served by :func:`serve`."""

from __future__ import annotations

import os

from difflab import __version__
from difflab.app import (
    ask_tab,
    control_tab,
    depth_tab,
    edit_tab,
    generate_tab,
    schedules_tab,
    train_tab,
    world_tab,
)
from difflab.errors import DifflabError

TABS = {"World": world_tab, "Schedules": schedules_tab, "Generate": generate_tab, "Edit": edit_tab,
        "Control": control_tab, "Depth": depth_tab, "Ask": ask_tab, "Train": train_tab}  # fmt: skip
"""Each tab's name and its module (whose ``build(page, runs)`` lays it out), in the order the page shows them."""

CSS = """
.difflab-error { color: #b91c1c; font-weight: 600; }
.difflab-note { color: #475569; }
.difflab-readings td, .difflab-readings th { padding: 2px 8px; text-align: left; }
.difflab-pixels img { image-rendering: pixelated; }  /* tiles, not plots */
"""

INTRO = (
    "# difflab\n"
    "Diffusion, CLIP and vision-language models from scratch, on the toy world. Every picture here is "
    "drawn by the same functions as the command line (`difflab world preview`, `difflab schedule`, "
    "`difflab generate`, `difflab edit`, `difflab p2p`, `difflab ask`, `difflab eval`, `difflab train`), and "
    "bad input gets the same one-line errors."
)


def build_page(runs: list[str] | tuple[str, ...] = ()):
    """The page as a ``gr.Blocks``: each tab's module lays its tab out; ``runs`` fill the run choosers."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
    try:
        import gradio as gr
    except ImportError:
        raise DifflabError("difflab app needs gradio; install it with: pip install 'difflab[app]' "
                           "(from a clone: pip install -e '.[app]')") from None  # fmt: skip
    runs = [str(r) for r in runs]
    with gr.Blocks(title=f"difflab {__version__}", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Tabs():
            for name, tab in TABS.items():
                with gr.Tab(name, id=name.lower()):
                    tab.build(page, runs)
    return page


def serve(page, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Start ``page`` on ``host:port`` in the background (no share link, nothing fetched from outside) and return
    its URL; ``page.close()`` stops it. A port in use is a named error."""
    try:
        page.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                    prevent_thread_lock=True, quiet=True, css=CSS, footer_links=[])  # fmt: skip
    except OSError:
        raise DifflabError(f"cannot serve on {host}:{port}: the port is in use or the address is not this "
                           "machine's; choose another with --port or --host") from None  # fmt: skip
    return f"http://{host}:{port}/"
