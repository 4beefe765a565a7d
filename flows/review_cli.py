"""``medvlm review serve|export``: the review workbench over an output, and its gold export.

``serve`` runs the web application (``medvlm_core.review.app``) with uvicorn on 127.0.0.1 by default. Another
address needs TLS (``--ssl-certfile``/``--ssl-keyfile``) or ``--insecure``, which is logged. Every request needs
the token: ``MEDVLM_REVIEW_TOKEN``, or one made at start and printed with the address, as Jupyter does. uvicorn's
own access log is off (it would print query strings, where a browser's first request carries the token); the
app logs one line per request without them.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from medvlm.flows.in_process import EXIT_OK, fail

DEFAULT_PORT = 8765


def add_review_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``review`` command and its ``serve`` and ``export`` subcommands.

    Args:
        add: makes a subcommand parser of ``medvlm`` (``name, help=...``).
    """
    review = add("review", help="check doubtful answers beside the page image; export the reviewed pages as gold")
    sub = review.add_subparsers(dest="review_command", required=True)

    serve = sub.add_parser("serve", allow_abbrev=False, help="serve the review workbench over an output")
    serve.add_argument("--output", required=True, help="the output folder or s3:// prefix of medvlm runs")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    serve.add_argument("--threshold", type=float, default=0.9,
                       help="items below this confidence are to check, where no medvlm eval gives a threshold "
                            "(default: 0.9)")
    serve.add_argument("--reviewer", help="the reviewer's name for every session (default: asked at login)")
    serve.add_argument("--document", dest="documents", action="append", default=[], metavar="DOCUMENT_ID",
                       help="a document to review whatever its answers (repeatable)")
    serve.add_argument("--ssl-certfile", help="TLS certificate (PEM), to serve https")
    serve.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow an address other than loopback without TLS (logged; PHI crosses the network "
                            "in clear)")
    serve.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")

    export = sub.add_parser("export", allow_abbrev=False, help="write the reviewed pages as a gold file (medvlm eval)")
    export.add_argument("--output", required=True, help="the output folder or s3:// prefix of medvlm runs")
    export.add_argument("--gold", required=True, help="the gold file to write (.csv, .jsonl or .parquet; local or s3://)")
    export.add_argument("--table", dest="tables", action="append", metavar="TABLE",
                        help="only this table (repeatable; default: every reviewed table)")
    export.add_argument("--reviewer", default="export", help="who exports (recorded in the access log)")
    export.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")


def _storage(endpoint: str | None) -> Any:
    from medvlm_core.settings import Settings
    from medvlm_core.storage import Storage, s3_options

    settings = Settings()
    return Storage({"s3": s3_options(endpoint_url=endpoint or settings.s3_endpoint)}, retry=settings.retry_policy())


def cmd_review(args: argparse.Namespace) -> int:
    """``medvlm review``: run the chosen subcommand.

    Args:
        args: the parsed command line.

    Returns:
        The exit status: 0 when done, 2 when it cannot run (the message says why).
    """
    return {"serve": cmd_serve, "export": cmd_export}[args.review_command](args)


def cmd_serve(args: argparse.Namespace) -> int:
    """``medvlm review serve``: the workbench until interrupted.

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    import logging

    import uvicorn

    from medvlm_core.analytics import table_names
    from medvlm_core.review.app import ReviewConfig, create_app
    from medvlm_core.review.auth import is_loopback, new_token
    from medvlm_core.settings import Settings

    tls = bool(args.ssl_certfile and args.ssl_keyfile)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        return fail("--ssl-certfile and --ssl-keyfile go together")
    if not is_loopback(args.host) and not tls and not args.insecure:
        return fail(f"refusing to serve on {args.host} without TLS: give --ssl-certfile and --ssl-keyfile, or "
                    "--insecure to send PHI over the network in clear")
    if not 0 <= args.threshold <= 1:
        return fail("--threshold must be between 0 and 1")
    storage = _storage(args.s3_endpoint)
    if "completions" not in table_names(storage, args.output):
        return fail(f"output {args.output}: no completions table (no published run)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("medvlm.review")
    if not is_loopback(args.host) and not tls:
        log.warning("serving on %s without TLS (--insecure): pages and images cross the network in clear", args.host)
    secret = Settings().review_token
    token = secret.get_secret_value() if secret is not None else new_token()
    config = ReviewConfig(output=args.output, storage=storage, token=token, reviewer=args.reviewer,
                          threshold=args.threshold, picked=tuple(args.documents), secure=tls)
    app = create_app(config)
    scheme = "https" if tls else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    address = f"{scheme}://{host}:{args.port}/"
    if secret is None:
        print(f"medvlm review: serving {args.output} at {address}?token={token}", flush=True)
    else:
        print(f"medvlm review: serving {args.output} at {address} (token: MEDVLM_REVIEW_TOKEN)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, server_header=False, log_level="info",
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``medvlm review export``: the reviewed pages as a gold file.

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    from medvlm_core.errors import RunError
    from medvlm_core.review.export import export_gold

    try:
        result = export_gold(args.output, _storage(args.s3_endpoint), args.gold, args.tables, args.reviewer)
    except RunError as exc:
        return fail(str(exc))
    print(f"gold: {result.url}: {result.pages} reviewed page(s), {result.items} item(s) of "
          f"{', '.join(result.tables) or 'no table'}")
    for note in result.notes:
        print(f"  note: {note}")
    return EXIT_OK
