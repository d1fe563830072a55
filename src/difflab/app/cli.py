"""``difflab app [RUN ...]``: the lab in a local browser page (:mod:`difflab.app`)."""

from __future__ import annotations

import sys
import time

from difflab import cli_types
from difflab.models.runs import read_run_config

PORT = cli_types.integer(1, 65535)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "app",
        help="the lab in a local web page: the world, schedules, generation, editing, control, depth, "
        "questions and training",
        description="Serve a local web page (Gradio) on --host:--port: the World tab draws scenes of a preset with "
        "their fields and the reader's reading; Schedules plots alpha-bar, log-SNR and beta with the numbers "
        "explained; Generate draws a run's images of a prompt with the reader's verdict, the cross-attention maps "
        "per word and the denoising trajectory; Edit runs InstructPix2Pix or Prompt-to-Prompt; Control draws "
        "under a ControlNet's condition; Depth estimates held-out scenes; Ask puts questions to a "
        "vision-language run; Train follows a run's loss curve and sample grids and starts tiny presets. "
        "Nothing is fetched from the internet. docs/app.md shows each tab.",
    )
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run directories to offer in the tabs (each lists the kinds it takes; others can be "
                   "typed in)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: 127.0.0.1, this machine only)")  # fmt: skip
    p.add_argument("--port", type=PORT, default=7860, help="port (default: 7860)")
    p.set_defaults(func=_app)


def _app(args) -> int:
    for run in args.runs:  # a typo is named before the server starts
        read_run_config(run)
    from difflab.app.page import build_page, serve

    page = build_page(args.runs)
    url = serve(page, args.host, args.port)
    print(f"difflab app: serving {url} (Ctrl-C to stop)", file=sys.stderr)
    try:
        while page.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how the page is stopped: not an error
    finally:
        page.close()
    return 0
