"""`vlmux serve`, and `vlmux ps`, `vlmux load`, `vlmux unload` talking to a running server over its HTTP API."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def add_commands(commands) -> None:
    from vlmux.serve.settings import budget_option, option, parse_duration, parse_residency, whole_option

    serve = commands.add_parser("serve", help="an OpenAI-compatible server for many models under one VRAM budget",
                                epilog="The API key may also come from VLMUX_API_KEY (kept out of the process list).")
    serve.add_argument("--model", action="append", default=[], metavar="NAME=MODEL",
                       help="a model to serve as NAME (a hub id or a local folder); repeatable")
    serve.add_argument("--config", type=Path, help="a TOML file of [[model]] tables (name, model, dtype, decode, "
                                                   "keep_alive, pinned, max_concurrent)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--port", type=option(_port), default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    serve.add_argument("--vram-budget", default="0.8", type=option(budget_option),
                       help="what the models may use of each GPU: 0.8 of it, 80%%, or 40GiB (a bare number is a fraction)")
    serve.add_argument("--api-key", default=os.environ.get("VLMUX_API_KEY"), help="every route but /health needs it")
    serve.add_argument("--keep-alive", default="5m", type=option(parse_duration), help="how long an idle model stays loaded: 300, 5m, 0, -1 (forever)")
    serve.add_argument("--min-residency", default="auto", type=option(parse_residency), metavar="SECONDS|auto",
                       help="how long a busy model keeps taking its own new requests after its load while another "
                            "model's load waits for its memory (an idle one is evicted at once): seconds, 0 for none, "
                            "or auto (default): as long as its own load took, so at most about half of the time goes "
                            "to switching")
    serve.add_argument("--max-queue", type=option(whole_option(1)), default=256, help="chat requests held at once; more are answered 429")
    serve.add_argument("--max-tokens", type=option(whole_option(1)), default=256, help="max_tokens when a request gives none")
    serve.add_argument("--max-images", type=option(whole_option(1)), default=16,
                       help="images one chat request may hold (more: 400)")
    serve.add_argument("--max-request-pixels", type=option(whole_option(1)), default=80_000_000,
                       help="pixels of all of a request's images together, read from their headers (more: 400)")
    serve.add_argument("--max-chars", type=option(whole_option(1)), default=100_000,
                       help="characters of text one request may hold")
    serve.add_argument("--request-timeout", metavar="DURATION", type=option(parse_duration),
                       help="a chat request not answered within it (30, 90s, 5m) gets 504 and its generating stops; "
                            "default none")
    serve.add_argument("--allow-any-model", action="store_true", help="requests may name any hub id or local folder")
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    serve.add_argument("--allow-private-images", action="store_true",
                       help="with --allow-remote-images, also from private, loopback and link-local addresses")
    serve.add_argument("--allow-local-images", type=Path, metavar="DIR", help="image paths are read under DIR only")
    serve.set_defaults(run=_serve)

    for name, help_text in (("ps", "the models a running server holds"), ("load", "load a model in a running server"),
                            ("unload", "unload a model (or all) from a running server; waits for verified release")):
        command = commands.add_parser(name, help=help_text)
        if name != "ps":
            command.add_argument("model", nargs="?" if name == "unload" else None, help="its name (unload: none for all)")
        command.add_argument("--url", default=os.environ.get("VLMUX_URL", DEFAULT_URL), help=f"default {DEFAULT_URL}")
        command.add_argument("--api-key", default=os.environ.get("VLMUX_API_KEY"))
        command.add_argument("--json", action="store_true", help="print the server's JSON answer")
        command.set_defaults(run=_client)


def serve_config(args: argparse.Namespace):
    from vlmux.serve.limits import RequestLimits
    from vlmux.serve.settings import ServeConfig, model_option, models_from_toml, unique

    entries = tuple(model_option(text) for text in args.model)
    if args.config is not None:
        entries += models_from_toml(args.config)
    if not entries and not args.allow_any_model:
        raise ValueError("name at least one model (--model NAME=MODEL or --config FILE), or pass --allow-any-model")
    if args.allow_local_images is not None and not args.allow_local_images.is_dir():
        raise ValueError(f"--allow-local-images {args.allow_local_images}: not a folder")
    return ServeConfig(args.host, args.port, args.device, args.vram_budget, args.api_key or None, args.keep_alive,
                       args.max_queue, unique(entries), args.allow_any_model, args.allow_remote_images,
                       args.allow_private_images, args.allow_local_images, default_max_tokens=args.max_tokens,
                       min_residency=args.min_residency,
                       limits=RequestLimits(args.max_images, args.max_request_pixels, args.max_chars,
                                            args.request_timeout))


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("vlmux serve needs its extra: pip install 'vlmux[serve]'") from None

    from vlmux.config import PoolConfig
    from vlmux.pool import ModelPool, vram
    from vlmux.serve.app import create_app
    from vlmux.serve.service import Service

    config = serve_config(args)
    if not _is_loopback(config.host) and config.api_key is None:
        print(f"vlmux serve: warning: listening on {config.host} without --api-key: anyone who reaches it may use it",
              file=sys.stderr)
    # The spare gets warm for the configured models after the first load, so a first switch is as fast as later ones.
    prewarm = [Service.spec_of(config, entry) for entry in config.models]
    pool = ModelPool(PoolConfig(vram_budget=config.vram_budget, keep_alive=config.keep_alive,
                                min_residency=config.min_residency, prewarm=prewarm))
    app = create_app(Service(config, pool, vram.NVML))
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"vlmux serve: listening on http://{shown}:{port} ({len(config.models)} models named)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0


def _client(args: argparse.Namespace) -> int:
    path, body = {"ps": ("/api/ps", None), "load": ("/api/load", {"model": getattr(args, "model", None)}),
                  "unload": ("/api/unload", {"model": getattr(args, "model", None)} if getattr(args, "model", None)
                             else {})}[args.command]
    try:
        answer = request(args.url, path, body, args.api_key)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        print(f"vlmux {args.command}: {e.code}: {detail}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"vlmux {args.command}: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.command == "unload":
        for each in answer["unloaded"]:
            print(f"{each['model']}: {each['release']}")
        if not answer["unloaded"]:
            print("nothing was loaded")
        if answer.get("spare"):
            print(f"spare worker: {answer['spare']['release']}")
    else:
        if args.command == "load":
            print(f"{answer['model']} loaded in {answer['seconds']:.2f} s")
        _print_ps(answer)
    return 0


def request(url: str, path: str, body: dict | None, api_key: str | None, timeout: float = 600.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    sent = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(sent, timeout=timeout) as response:
        return json.loads(response.read())


def _print_ps(answer: dict) -> None:
    print(f"{'NAME':<20} {'STATE':<9} {'WHERE':<10} {'MEMORY':>15} {'IN FLIGHT':>9} {'UNLOADS IN':>10}")
    for m in answer["models"]:
        where = ",".join(f"GPU {g}" for g in m["gpus"]) or m["device"]
        held, kind = (m["vram_bytes"], "VRAM") if m["gpus"] else (m["host_bytes"], "host")  # host: private pages
        expires = ("never" if m["keep_alive"] is None else "" if m["expires_at"] is None
                   else f"{max(0.0, m['expires_at'] - time.time()):.0f} s")
        print(f"{m['name']:<20} {m['state']:<9} {where:<10} {held / 2**20:>7.0f} MiB {kind:<4} {m['in_flight']:>9} {expires:>10}")
    if not answer["models"]:
        print("(no model loaded)")
    spare = answer.get("spare")
    if spare:
        where = ",".join(f"GPU {g}" for g in spare["gpus"]) or "cpu"
        print(f"spare worker {spare['pid']}: {spare['state']} on {where}, {spare['vram_bytes'] / 2**20:.0f} MiB"
              + (f", ready for {len(spare['models'])} model(s)" if spare["models"] else ""))


def _port(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 65535:
        raise ValueError(f"a port from 0 (any free one) to 65535, not {text!r}")
    return int(text)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
