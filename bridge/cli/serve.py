"""Workstation commands: `bridge serve`, `bridge token`, `bridge login`, `bridge url`, `bridge status`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import requests
import typer
from rich.table import Table

from bridge import config, secrets, ui
from bridge.cli.output import console, err_console, handles_errors
from bridge.errors import ConfigError, RecordError, ServeError
from bridge.processes import pid_alive
from bridge.record import LOOPBACK_HOSTS, describe_url
from bridge.rendezvous import DEFAULT_RELAY, DEFAULT_REPUBLISH_S, RELAY_ENV, relay_url

PUBLISH_HELP = (
    "Where to publish the signed endpoint record: file:PATH (e.g. a Google-Drive-synced folder), "
    "gist:GIST_ID (a secret GitHub gist; token from `bridge login --github-token`) or an https:// URL "
    "(PUT). Default: endpoint.json in the bridge data folder."
)
RELAY_HELP = (
    "The ntfy-compatible relay the record also goes to, encrypted under a key derived from the access token, on a "
    "topic derived from it: Colab then needs only BRIDGE_TOKEN. A self-hosted ntfy server's https:// URL, or 'off'. "
    "Not used without a tunnel (a 127.0.0.1 URL helps nobody)."
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("serve")(serve_command)
    app.command("token")(token_command)
    app.command("login")(login_command)
    app.command("url")(url_command)
    app.command("status")(status_command)


@handles_errors
def serve_command(
    port: Annotated[
        int, typer.Option(help="Port of the MLflow server and its local UI (127.0.0.1 only).", envvar="BRIDGE_PORT")
    ] = config.DEFAULT_MLFLOW_PORT,
    entrance_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the authenticated entrance the tunnel points at. Default: --port + 1.",
            envvar="BRIDGE_ENTRANCE_PORT",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address the entrance binds. Keep 127.0.0.1 behind ngrok; name a LAN/VPN address "
            "(e.g. a Tailscale IP) to serve it there with --tunnel none; 0.0.0.0 binds every address and "
            "publishes this machine's default-route address.",
            envvar="BRIDGE_HOST",
        ),
    ] = config.DEFAULT_HOST,
    tunnel: Annotated[
        str,
        typer.Option(
            help="auto: ngrok when an authtoken is configured, else a Cloudflare quick tunnel when cloudflared is "
            "installed, else none. ngrok: an ngrok tunnel (needs `bridge login` or NGROK_AUTHTOKEN; without one "
            "bridge serves the entrance alone). cloudflared: a Cloudflare quick tunnel (no account; a new "
            "*.trycloudflare.com URL each start, which the signed record follows; binary from PATH or "
            "BRIDGE_CLOUDFLARED_PATH). none: no tunnel.",
            envvar="BRIDGE_TUNNEL",
        ),
    ] = "auto",
    domain: Annotated[
        str | None,
        typer.Option(
            help="A reserved/static ngrok domain, so the public URL survives restarts.", envvar="BRIDGE_NGROK_DOMAIN"
        ),
    ] = None,
    edge_auth: Annotated[
        bool,
        typer.Option(
            "--edge-auth",
            help="Also make ngrok's edge demand HTTP Basic (user `bridge`, password = access token, "
            "which ngrok then holds). Off by default: Bearer-token clients are refused at the edge.",
        ),
    ] = False,
    publish: Annotated[str | None, typer.Option(help=PUBLISH_HELP, envvar="BRIDGE_PUBLISH")] = None,
    relay: Annotated[str, typer.Option(help=RELAY_HELP, envvar=RELAY_ENV)] = DEFAULT_RELAY,
    no_relay: Annotated[
        bool, typer.Option("--no-relay", help="Publish nothing to a relay (same as --relay off).")
    ] = False,
    relay_republish: Annotated[
        float,
        typer.Option(
            help="Seconds between republishes to the relay when nothing changed; ntfy.sh forgets a message after "
            "12 h and allows 250 messages a day.",
            envvar="BRIDGE_RELAY_REPUBLISH_S",
        ),
    ] = DEFAULT_REPUBLISH_S,
    backend_store_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow backend store, e.g. postgresql://user@host/db. Default: SQLite in the bridge data folder.",
            envvar="BRIDGE_BACKEND_STORE_URI",
        ),
    ] = None,
    artifacts_destination: Annotated[
        str | None,
        typer.Option(
            help="Where MLflow stores artifacts it serves, e.g. s3://bucket/path. Default: the bridge data folder.",
            envvar="BRIDGE_ARTIFACTS_DESTINATION",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="MLflow uvicorn workers (1 is lean and fast; raise for teams).", envvar="BRIDGE_WORKERS", min=1
        ),
    ] = config.DEFAULT_WORKERS,
    heartbeat_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds without a client heartbeat after which a RUNNING run is marked KILLED. Clients beat "
            "every 60 s (BRIDGE_HEARTBEAT_S on their side): keep this several times longer.",
            envvar="BRIDGE_HEARTBEAT_TIMEOUT",
        ),
    ] = float(config.DEFAULT_HEARTBEAT_TIMEOUT_S),
    tunnel_budget_gb: Annotated[
        float,
        typer.Option(
            help="Monthly budget of bytes sent out through the tunnel, in GB (ngrok's free plan: 1); `bridge status` "
            "shows this month's use and warns at 80 %. 0: no budget.",
            envvar="BRIDGE_TUNNEL_BUDGET_GB",
            min=0,
        ),
    ] = config.DEFAULT_TUNNEL_BYTES_BUDGET / 1e9,
    tunnel_budget_requests: Annotated[
        int,
        typer.Option(
            help="Monthly budget of HTTP requests through the tunnel (ngrok's free plan: 20000). 0: no budget.",
            envvar="BRIDGE_TUNNEL_BUDGET_REQUESTS",
            min=0,
        ),
    ] = config.DEFAULT_TUNNEL_REQUESTS_BUDGET,
    tunnel_grace: Annotated[
        float,
        typer.Option(
            help="Seconds a tunnel agent that lost its edge connection (still running, not ready) gets to reconnect "
            "on the same URL before it is replaced by one with a new URL. The default covers cloudflared's own "
            "reconnect backoff; an agent that exits is replaced at once.",
            envvar="BRIDGE_TUNNEL_GRACE",
            min=0,
        ),
    ] = config.DEFAULT_TUNNEL_GRACE_S,
) -> None:
    """Run MLflow, the authenticated entrance and the ngrok tunnel; publish the signed URL. Ctrl-C stops all."""
    from bridge.serve.supervisor import ServeOptions, serve

    options = ServeOptions(
        port=port, entrance_port=entrance_port, host=host, tunnel=tunnel.lower(), domain=domain,
        edge_auth=edge_auth, publish=publish, backend_store_uri=backend_store_uri,
        relay=None if no_relay else relay_url(relay, what="--relay"), relay_republish_s=relay_republish,
        artifacts_destination=artifacts_destination, workers=workers, heartbeat_timeout_s=heartbeat_timeout,
        bytes_budget=tunnel_budget_gb * 1e9, requests_budget=tunnel_budget_requests, tunnel_grace_s=tunnel_grace,
        tunnel_check_interval_s=config.env_float(config.TUNNEL_CHECK_ENV, config.DEFAULT_TUNNEL_CHECK_S),
    )  # fmt: skip
    err_console.print("Starting MLflow, the entrance and the tunnel…", style="dim")
    serve(
        options,
        on_ready=lambda info: _print_ready(info, publish, options.relay),
        on_event=lambda event: _print_event(event, publish, options.relay),
    )


def _print_link(label: str, url: str) -> None:
    """`label`, then `url` on a line of its own, never cut or wrapped by rich: indented only where it still fits."""
    console.print(f"[bold]{label}[/]", highlight=False)
    indent = "  " if len(url) + 2 <= console.width else ""
    console.print(indent + url, soft_wrap=True, markup=False, highlight=False)


def _print_ready(info, publish_spec: str | None, relay: str | None = None) -> None:
    from bridge.serve.usage import tunnel_limits

    console.rule("bridge serve is running", align="left")
    _print_link("MLflow UI (this machine)", ui.ui_link(info.mlflow_url))
    _print_link("Entrance (token required)", info.entrance_url)
    if info.public_url:
        _print_link(f"Public URL ({info.tunnel_mode})", info.public_url)
    elif info.tunnel_mode != "none":
        console.print(
            f"[bold]Public URL ({info.tunnel_mode})[/]: [yellow]not open yet[/] (retried; printed below once open)"
        )
    else:
        console.print("[bold]Public URL[/]: [yellow]none (no tunnel)[/]")
    published = info.published_to if not info.publish_error else f"[red]failed[/] ({info.publish_error}); retrying"
    console.print(f"[bold]Record published to[/]: {published}", soft_wrap=True, highlight=False)
    if info.relay:
        sealed = "the record encrypted, on a token-derived topic (ciphertext only)"
        if info.relay_error:
            sealed = f"[red]failed[/] ({info.relay_error}); retrying"
        console.print(
            f"[bold]Relay[/]: {describe_url(relay or DEFAULT_RELAY)} · {sealed}", soft_wrap=True, highlight=False
        )
    else:
        off = "off" if relay is None else "not used (no tunnel: the URL is this machine only)"
        console.print(f"[bold]Relay[/]: {off}", highlight=False)
    limits = tunnel_limits(info.tunnel_mode)
    if limits:
        console.print(f"[bold]Tunnel limits[/]: {limits}.", highlight=False)
    for note in info.notes:
        console.print(f"[yellow]Note:[/] {note}", highlight=False)
    console.print("Colab: add a secret [bold]BRIDGE_TOKEN[/] (value: run `bridge token` here), then run:")
    # soft_wrap: a cropped or re-wrapped line would not paste as valid Python.
    pending = info.public_url is None and info.tunnel_mode != "none"
    snippet = colab_snippet(
        info.record_url, publish_spec, relay if info.relay else None, tunnel_pending=pending, wheel_url=_wheel_url(info)
    )
    console.print(snippet, soft_wrap=True, markup=False, highlight=False)
    console.print(
        "Press Ctrl-C to stop. Changes (a new URL, a reopened tunnel, failures) are printed below.", style="dim"
    )
    sys.stdout.flush()


def _print_event(event, publish_spec: str | None, relay: str | None = None) -> None:
    """One line per change while serving; a new URL also gets its own line and the updated Colab cell."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
    console.print(f"{stamp} {event.message}", soft_wrap=True, markup=False, highlight=False)
    if event.record_url:
        _print_link("New URL (published in the signed record)", event.record_url)
        console.print("Colab, updated (a notebook reading the record follows by itself):", highlight=False)
        from bridge.serve.wheel import public_path

        snippet = colab_snippet(event.record_url, publish_spec, relay, wheel_url=event.record_url + public_path())
        console.print(snippet, soft_wrap=True, markup=False, highlight=False)
    sys.stdout.flush()


def _wheel_url(info) -> str | None:
    """Where a notebook installs this workstation's bridge: the public URL (or the entrance) + the wheel's path."""
    return info.record_url.rstrip("/") + info.wheel_path if info.wheel_path else None


def colab_snippet(
    url: str,
    publish_spec: str | None,
    relay: str | None = None,
    *,
    tunnel_pending: bool = False,
    wheel_url: str | None = None,
) -> str:
    """The notebook cell that installs bridge from this workstation and connects; it names where to look, never a
    secret. `wheel_url`: the client wheel the entrance serves (no token needed to fetch it).

    With a `relay`, the token alone finds the workstation: no URL is pinned (a pinned URL is never re-discovered).
    `tunnel_pending`: a tunnel is being retried, so a loopback `url` is only for now (the relay gets the public
    one once it opens)."""
    if relay is not None and not publish_spec:
        where = "# the access token alone finds this workstation through the relay, and follows every URL change"
        if relay != DEFAULT_RELAY:
            where = f'os.environ["{RELAY_ENV}"] = "{relay}"  # your relay; ' + where[2:]
    elif publish_spec and publish_spec.startswith(("https://", "http://")):
        # The query (ntfy's ?auth=…) or user info may be a key: the cell names the place, the user adds the key.
        parts = urlsplit(publish_spec)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{host}:{parts.port}" if parts.port else host
        bare = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        where = f'os.environ["BRIDGE_DISCOVERY"] = "{bare}"  # signed record: follows URL changes'
        if parts.query or parts.username or parts.password:
            where += (
                "\n# left out: the key (query or user info) of your --publish URL; if reading needs it, add it from a "
                "Colab secret, not as text in the notebook"
            )
    elif publish_spec and publish_spec.startswith("gist:"):
        where = f'os.environ["BRIDGE_DISCOVERY"] = "{publish_spec}"  # signed record: follows URL changes'
    elif publish_spec and publish_spec.startswith("file:"):
        where = (
            f'os.environ["BRIDGE_DISCOVERY"] = "{publish_spec}"  # signed record: follows URL changes\n'
            "# (use the path Colab sees, e.g. file:/content/drive/MyDrive/... for a Drive-synced folder)"
        )
    elif (urlsplit(url).hostname or "") in LOOPBACK_HOSTS:
        hint = (
            "# (for Colab: use the public URL `bridge serve` prints once the tunnel opens)"
            if tunnel_pending
            else "# (for Colab: `bridge login`, restart `bridge serve`, and use the public URL it prints)"
        )
        where = f'os.environ["BRIDGE_URL"] = "{url}"  # this machine only: no tunnel is open\n{hint}'
    else:
        where = f'os.environ["BRIDGE_URL"] = "{url}"  # changes when the tunnel restarts (not with an ngrok --domain)'
    install = (
        f'%pip install -q "bridge[yolo] @ {wheel_url}"  # this workstation\'s own bridge, no token needed\n'
        if wheel_url
        else ""
    )
    return (
        f"{install}" + ("" if where.startswith("#") else "import os\n") + f"{where}\n"
        "import bridge\n"
        "conn = bridge.connect()  # reads the Colab secret BRIDGE_TOKEN (value: `bridge token` here)\n"
    )


@handles_errors
def token_command(
    rotate: Annotated[
        bool, typer.Option("--rotate", help="Replace the token; the old one stops working at once.")
    ] = False,
) -> None:
    """Print the access token alone on stdout (create it on first use), for Colab's BRIDGE_TOKEN secret."""
    if rotate:
        token = secrets.rotate_access_token()
        err_console.print(
            "Rotated the access token: the old one is refused from now on. Update BRIDGE_TOKEN wherever it is used.",
            highlight=False,
        )
    else:
        token = secrets.access_token(create=True)
    typer.echo(token)


@handles_errors
def login_command(
    authtoken: Annotated[
        str | None,
        typer.Argument(
            help="Your ngrok authtoken (https://dashboard.ngrok.com/get-started/your-authtoken). Best omitted: "
            "you are then prompted for it (hidden). '-' reads it from stdin (e.g. from a password manager). "
            "Given as text here it lands in your shell history and the process list; meant for scripts only.",
            show_default=False,
        ),
    ] = None,
    github_token: Annotated[
        str | None,
        typer.Option(
            "--github-token",
            help="Also store a GitHub token (gist scope) for --publish gist:ID; '-' prompts for it "
            "(hidden) or reads it from stdin when that is not a terminal. Given as text it "
            "lands in your shell history.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Store the ngrok authtoken (and optionally a GitHub token) in the OS keyring; prompts (hidden) by default."""
    if github_token is not None:
        value = _read_secret("GitHub token") if github_token == "-" else github_token
        _store(secrets.GITHUB_TOKEN, value, "GitHub token")
        if authtoken is None:
            return
    value = _read_secret("ngrok authtoken") if authtoken in (None, "-") else authtoken
    _store(secrets.NGROK_AUTHTOKEN, value, "ngrok authtoken")


def _read_secret(what: str) -> str:
    """A hidden prompt on a terminal; one line of stdin when piped (`pass show ngrok | bridge login -`)."""
    if sys.stdin is not None and sys.stdin.isatty():
        return typer.prompt(what, hide_input=True)
    line = sys.stdin.readline() if sys.stdin is not None else ""
    if not line:
        raise ConfigError(f"no {what} on stdin; pipe it in, or run `bridge login` in a terminal to be prompted")
    return line


def _store(name: str, value: str, what: str) -> None:
    value = value.strip()
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"the {what} is empty or contains whitespace")
    secrets.set_secret(name, value)
    # Not even a masked tail: terminals are recorded and screen-shared.
    console.print(f"Stored the {what}.", highlight=False)


@handles_errors
def url_command(
    record: Annotated[
        Path | None, typer.Option(help="The record file to read. Default: endpoint.json in the bridge data folder.")
    ] = None,
) -> None:
    """Print the URL of the running `bridge serve`, from its local record once the signature verifies."""
    from bridge.record import verify_record

    path = record or config.paths().record_file
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ServeError(f"no endpoint record at {path}; is `bridge serve` running?") from None
    except OSError as exc:
        raise ServeError(f"cannot read {path}: {exc.strerror}") from None
    token = secrets.access_token(create=False)
    if token is None:
        raise RecordError("no access token on this machine, so the record cannot be verified; run `bridge serve`")
    url = verify_record(text, token).url
    typer.echo(url)
    typer.echo(f"MLflow UI (any user name, the token as password): {ui.ui_link(url)}", err=True)


def _probe(url: str | None, path: str = "/health") -> int | None:
    if not url:
        return None
    try:
        return requests.get(url + path, timeout=2).status_code
    except requests.RequestException:
        return None


def _ago(when: float | None) -> str:
    if not when:
        return "never"
    return f"{_duration(time.time() - when)} ago"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _usage_row(table: Table, state: dict, running: bool) -> str | None:
    """This month's requests and bytes sent out through the tunnel, against the budget; the warning, if any."""
    from bridge.serve.usage import budget_warning, format_bytes, has_monthly_cap, month_of, read_usage, tunnel_limits

    usage = (state.get("usage") if running else None) or read_usage(config.paths().tunnel_usage_file) or {}
    month = month_of(time.time())
    if usage.get("month") != month:
        usage = {"month": month, "requests": 0, "bytes_out": 0}
    mode = (state.get("tunnel") or {}).get("mode", "none")
    if not has_monthly_cap(mode):
        table.add_row(
            f"Tunnel use {month}",
            "ok",
            f"{usage['requests']:,} requests · {format_bytes(usage['bytes_out'])} sent out · {tunnel_limits(mode)}",
        )
        return None
    budget = state.get("budget") or {}
    bytes_budget = float(budget.get("bytes", config.DEFAULT_TUNNEL_BYTES_BUDGET))
    requests_budget = float(budget.get("requests", config.DEFAULT_TUNNEL_REQUESTS_BUDGET))
    requests_text = f"{usage['requests']:,} requests" + (f" of {int(requests_budget):,}" if requests_budget else "")
    bytes_text = format_bytes(usage["bytes_out"]) + (f" of {format_bytes(bytes_budget)}" if bytes_budget else "")
    warning = budget_warning(usage, bytes_budget, requests_budget, tunnel=mode)
    table.add_row(
        f"Tunnel use {month}", "[yellow]near budget[/]" if warning else "ok", f"{requests_text} · {bytes_text} sent out"
    )
    return warning


def _relay_row(table: Table, state: dict) -> None:
    """Where the sealed record goes (never the topic), and how the last publish there went."""
    relay = state.get("relay") or {}
    if not relay.get("target"):
        table.add_row("Relay", "off", relay.get("note") or "")
        return
    last = relay.get("last") or {}
    detail = f"{relay['target']}: the sealed record, ciphertext only"
    if last:
        detail += f" · last {_ago(last.get('at'))}"
        if last.get("next_at"):
            detail += f", next in {_duration(last['next_at'] - time.time())}"
        if last.get("error"):
            detail += f" · {last['error']}"
    state_text = "none yet" if not last else ("[green]ok[/]" if last.get("ok") else "[red]failed[/]")
    table.add_row("Relay", state_text, detail)


def _secrets_row(table: Table, state: dict) -> None:
    """Where the serve process keeps the access token, and whether this shell reads the same store."""
    here = secrets.describe_store()
    served = state.get("secrets_store") or here
    detail = served if served == here else f"{served} · this shell uses {here}: `bridge token` here reads another store"
    table.add_row("Secrets", "[green]keyring[/]" if served.startswith("OS keyring") else "[yellow]file[/]", detail)


def _entrance_detail(entrance: dict) -> str:
    """The entrance's URL and the logins it refused from elsewhere (a wrong or missing token; then throttled)."""
    detail = str(entrance.get("url"))
    if "refused_logins" in entrance:
        detail += f" · refused logins {entrance['refused_logins']:,}"
        if entrance.get("throttled"):
            detail += f" (then throttled {entrance['throttled']:,})"
        if entrance.get("last_refused_at"):
            detail += f", last {_ago(entrance['last_refused_at'])}"
    return detail


def _tunnel_detail(tunnel: dict) -> str:
    """The public URL, and while it is not open why and when the next try comes."""
    detail = tunnel.get("public_url") or "no public URL"
    if tunnel.get("status") == "reconnecting" and tunnel.get("unready_s") is not None:
        detail += (
            f" · agent reconnecting for {tunnel['unready_s']:.0f} s (replaced after {tunnel.get('grace_s', 0):.0f} s)"
        )
    if tunnel.get("error"):
        detail += f" · {tunnel['error']}"
    if tunnel.get("next_try_at"):
        detail += f" · try {tunnel.get('failures', 0) + 1} in {max(0, tunnel['next_try_at'] - time.time()):.0f} s"
    return detail


@handles_errors
def status_command() -> None:
    """Show MLflow, entrance, tunnel, last publish and uptime of the local `bridge serve` (no secrets)."""
    from bridge.serve.supervisor import read_state

    state = read_state()
    if state is None:
        console.print(f"bridge serve has not run here (no {config.paths().state_file}).")
        console.print(f"Secrets: {secrets.describe_store()}", highlight=False)
        raise typer.Exit(1)
    running = pid_alive(state.get("pid")) and not state.get("stopped_at")
    mlflow_state = state.get("mlflow") or {}
    entrance = state.get("entrance") or {}
    tunnel = state.get("tunnel") or {}
    publish = state.get("last_publish") or {}

    table = Table(title="bridge serve", show_header=True, header_style="bold")
    table.add_column("Part")
    table.add_column("State")
    table.add_column("Details", overflow="fold")
    if running:
        uptime = _duration(time.time() - state["started_at"])
        process_state = "[green]running[/]" if state.get("ready_at") else "[yellow]starting[/]"
        table.add_row("Process", process_state, f"pid {state.get('pid')}, up {uptime}")
    else:
        last = _ago(state.get("stopped_at") or state.get("started_at"))
        table.add_row("Process", "[red]stopped[/]", f"pid {state.get('pid')} (last state {last})")
    health = _probe(mlflow_state.get("url")) if running else None
    table.add_row(
        "MLflow",
        "[green]healthy[/]" if health == 200 else "[red]unreachable[/]",
        f"{mlflow_state.get('url')} · pid {mlflow_state.get('pid')} · restarts {mlflow_state.get('restarts', 0)} · "
        f"{mlflow_state.get('backend_store_uri')}",
    )
    # Without credentials the entrance must answer 401: that proves it is up and still locked.
    code = _probe(entrance.get("url")) if running else None
    entrance_state = {401: "[green]up, locked[/]", None: "[red]unreachable[/]"}.get(code, f"[red]answered {code}[/]")
    table.add_row("Entrance", entrance_state, _entrance_detail(entrance))
    wheel = state.get("client_wheel") or {}
    if wheel:
        wheel_state = (
            "[red]failed[/]" if wheel.get("error") else "[green]ready[/]" if wheel.get("ready") else "building"
        )
        where = (tunnel.get("public_url") or entrance.get("url") or "") + str(wheel.get("path"))
        detail = f"{where} (public) · {wheel.get('downloads', 0)} downloads"
        table.add_row("Client wheel", wheel_state, detail + (f" · {wheel['error']}" if wheel.get("error") else ""))
    table.add_row(
        f"Tunnel ({tunnel.get('mode', 'none')})", str(tunnel.get("status", "disabled")), _tunnel_detail(tunnel)
    )
    warning = _usage_row(table, state, running)
    if publish:
        ok = "[green]ok[/]" if publish.get("ok") else "[red]failed[/]"
        detail = f"{publish.get('url')} → {publish.get('target')}, {_ago(publish.get('at'))}"
        if publish.get("error"):
            detail += f" · {publish['error']}"
        table.add_row("Last publish", ok, detail)
    else:
        table.add_row("Last publish", "none", "")
    _relay_row(table, state)
    _secrets_row(table, state)
    console.print(table)
    # A narrow table folds long cells: the links are repeated below, each whole on a line of its own.
    if running and tunnel.get("public_url"):
        _print_link("Public URL", tunnel["public_url"])
    if running and mlflow_state.get("url"):
        _print_link("MLflow UI (this machine)", ui.ui_link(mlflow_state["url"]))
    if warning:
        console.print(f"[yellow]Warning:[/] {warning}", highlight=False)
    if not running:
        raise typer.Exit(1)
