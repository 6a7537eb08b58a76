"""`vlmux review OUTPUT`: the review page over a caption output, or with --export / --sidecar the curated set."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from vlmux.config import DEFAULT_PROMPT


def add_command(commands) -> None:
    review = commands.add_parser(
        "review", help="pick the best caption per image from several models, in the browser",
        epilog="Keys on the page: j / k next and previous, 1-9 choose that model's caption, e edit, x reject, "
               "u undo, / search. Every decision is written to .OUTPUT.review.jsonl beside the output at once.")
    review.add_argument("output", type=Path, metavar="OUTPUT",
                        help="what `vlmux caption` wrote: .jsonl, .csv, .parquet, metadata.jsonl / .csv, or a folder of sidecar files")
    review.add_argument("--images", type=Path, metavar="ROOT",
                        help="the folder the output's file names are relative to (default: the output's folder)")
    review.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    review.add_argument("--port", type=int, default=8100, help="0 picks a free port (printed at start)")
    review.add_argument("--open", action="store_true", help="open the page in the default browser")
    review.add_argument("--export", type=Path, metavar="FILE",
                        help="write the curated set instead of serving: .jsonl, .csv, .parquet, metadata.jsonl or metadata.csv")
    review.add_argument("--sidecar", metavar="EXT", help="write the curated set as IMAGE.EXT beside each image instead of serving")
    review.add_argument("--server", metavar="URL", help="a running `vlmux serve` (or any OpenAI-compatible server) whose "
                        "models the page may ask for one more caption of an image")
    review.add_argument("--api-key", default=os.environ.get("VLMUX_API_KEY"), help="the --server's key")
    review.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"what the --server's model is asked (default: {DEFAULT_PROMPT!r})")
    review.add_argument("--max-tokens", type=int, default=64, help="the longest answer asked of the --server, in tokens")
    review.set_defaults(run=_review)


def _review(args: argparse.Namespace) -> int:
    from vlmux.caption.sources import UsageError

    if args.images is not None and not args.images.is_dir():
        raise UsageError(f"--images {args.images}: not a folder")
    if args.export is not None or args.sidecar is not None:
        from vlmux.review.export import export_review

        done = export_review(args.output, args.images, args.export, args.sidecar)
        where = args.export or f"sidecar files *.{args.sidecar}"
        print(f"{done.written} captions written to {where}; left out: {done.rejected} rejected, "
              f"{done.undecided} not reviewed" + (f", {done.missing} without a picture" if done.missing else ""))
        return 0
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("vlmux review needs the server extra: pip install 'vlmux[serve]'") from None
    from vlmux.review.app import LOOPBACK, create_app
    from vlmux.review.session import ReviewSession

    asker = None
    if args.server is not None:
        from vlmux.review.ask import Asker

        if not args.server.startswith(("http://", "https://")) or args.max_tokens < 1:
            raise UsageError(f"--server takes an http(s) URL such as http://127.0.0.1:8000 (not {args.server!r}), "
                             f"--max-tokens a number of at least 1")
        asker = Asker(args.server, args.api_key, args.prompt, args.max_tokens)
    session = ReviewSession(args.output, args.images)  # OutputBusy (exit 2) when a review or a job holds it
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(128)  # connections wait in the backlog from now on, so the printed address answers at once
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}"
        progress = session.progress()
        print(f"vlmux review: listening on {url} ({progress['total']} images, {len(session.models)} models, "
              f"{progress['reviewed']} reviewed)", flush=True)
        if session.items and session.image_path(0) is None:
            print(f"vlmux review: warning: {session.items[0].key} is not under {session.images}; pictures show only "
                  f"with --images ROOT, the folder `vlmux caption` was given", file=sys.stderr)
        if args.host not in LOOPBACK:
            print(f"vlmux review: warning: listening on {args.host}: anyone who reaches it can change the review",
                  file=sys.stderr)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        hosts = LOOPBACK if args.host in LOOPBACK else ("*",)  # beyond loopback: any name may lead to it
        uvicorn.Server(uvicorn.Config(create_app(session, asker=asker, hosts=hosts), log_level="warning")).run(sockets=[sock])
    finally:
        session.close()
    return 0
