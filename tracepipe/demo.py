"""`tracepipe demo`: a realistic sample loaded into a running stack through its public API.

A new user should see a living system in a minute: three suites (a web shop's checkout, a
support inbox, travel booking) with actions, four MCP servers with their tools, every
action bound to a tool, recorded sessions uploaded as real bundles (events, a HAR,
screenshots), and training examples in the fine-tuning JSONL format registered from
those sessions with several models. Everything goes through `tracepipe.client` as the
demo account, so RLS, validation and storage are exercised exactly as for any client.

Idempotent-ish: rows are looked up before they are created (suites by slug, servers by
name, actions and tools by name, bindings by action and tool, sessions and examples by
the `demo_key` in their metadata), so a second run adds nothing; only the API key is new
on every run (a secret is shown once), the previous demo keys being revoked. Names carry a
`demo` prefix so that they do not take names real data may want (slugs and MCP server
names are unique across the stack).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tracepipe import bundles
from tracepipe.client import Client, Example, Session, TracepipeError

DEMO_EMAIL = "demo@tracepipe.test"
DEMO_DISPLAY_NAME = "Demo User"
DEMO_KEY_NAME = "demo"
MODELS = ("gpt-4o-mini", "claude-3-5-haiku", "llama-3.1-8b-instruct")
SESSIONS_PER_SUITE = 3
EXAMPLES_PER_SESSION = 2

Log = Callable[[str], None]


def _schema(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


STR = {"type": "string"}
INT = {"type": "integer", "minimum": 1}

# The shared MCP catalog: server name → (url, transport, description, tools).
SERVERS: dict[str, tuple[str, str, str, dict[str, tuple[str, dict[str, Any]]]]] = {
    "demo-shop-catalog": ("https://mcp.shop.example/mcp", "streamable-http", "Product search and carts", {
        "search_catalog": ("Full-text product search", _schema({"q": STR, "limit": INT}, ["q"])),
        "get_product": ("One product with price and stock", _schema({"sku": STR}, ["sku"])),
        "add_cart_item": ("Put a product into a cart", _schema({"sku": STR, "qty": INT}, ["sku", "qty"])),
        "apply_coupon": ("Apply a coupon code to a cart", _schema({"cart": STR, "code": STR}, ["cart", "code"])),
    }),
    "demo-payments": ("https://mcp.payments.example/sse", "sse", "Charges and refunds", {
        "create_charge": ("Charge a cart's total", _schema({"cart": STR, "method": STR}, ["cart", "method"])),
        "refund_charge": ("Refund a charge, fully or in part",
                          _schema({"order": STR, "amount_cents": INT}, ["order"])),
    }),
    "demo-helpdesk": ("https://mcp.helpdesk.example/mcp", "streamable-http", "Tickets of the support inbox", {
        "create_ticket": ("Open a ticket", _schema({"subject": STR, "body": STR, "priority": STR}, ["subject"])),
        "post_reply": ("Reply to the customer on a ticket", _schema({"ticket": STR, "text": STR}, ["ticket", "text"])),
        "assign_ticket": ("Hand a ticket to a team", _schema({"ticket": STR, "team": STR}, ["ticket", "team"])),
    }),
    "demo-flights": ("stdio:///usr/local/bin/flights-mcp", "stdio", "Flight search and booking (local process)", {
        "search_flights": ("Offers between two airports on a day",
                           _schema({"origin": STR, "destination": STR, "date": STR}, ["origin", "destination"])),
        "book": ("Book an offer for a passenger", _schema({"offer": STR, "passenger": STR}, ["offer", "passenger"])),
        "cancel": ("Cancel a booking", _schema({"booking": STR}, ["booking"])),
    }),
}


@dataclass(frozen=True)
class DemoAction:
    name: str
    description: str
    input_schema: dict[str, Any]
    server: str
    tool: str
    mapping: dict[str, str]  # tool argument → JSONPath into the action's input


@dataclass(frozen=True)
class DemoSuite:
    slug: str
    name: str
    description: str
    host: str
    pages: tuple[str, ...]
    targets: tuple[str, ...]
    actions: tuple[DemoAction, ...] = field(default_factory=tuple)


SUITES = (
    DemoSuite("demo-checkout", "Checkout flow", "An agent buys in a web shop: search, cart, coupon, payment.",
              "shop.example", ("search", "product", "cart", "checkout"),
              ("#search", "button.add-to-cart", "#coupon", "button.pay", "a.product"), (
        DemoAction("search_products", "Find products matching a query",
                   _schema({"query": STR, "max_results": INT}, ["query"]),
                   "demo-shop-catalog", "search_catalog", {"q": "$.query", "limit": "$.max_results"}),
        DemoAction("add_to_cart", "Add a product to the cart", _schema({"sku": STR, "quantity": INT}, ["sku"]),
                   "demo-shop-catalog", "add_cart_item", {"sku": "$.sku", "qty": "$.quantity"}),
        DemoAction("apply_coupon", "Apply a coupon code", _schema({"cart_id": STR, "code": STR}, ["cart_id", "code"]),
                   "demo-shop-catalog", "apply_coupon", {"cart": "$.cart_id", "code": "$.code"}),
        DemoAction("pay", "Pay the cart", _schema({"cart_id": STR, "method": {"enum": ["card", "paypal"]}},
                                                  ["cart_id", "method"]),
                   "demo-payments", "create_charge", {"cart": "$.cart_id", "method": "$.method"}),
    )),
    DemoSuite("demo-support", "Support inbox", "Triage customer emails: tickets, replies, escalations, refunds.",
              "help.shop.example", ("inbox", "ticket", "orders"),
              ("li.message", "#reply", "button.escalate", "button.refund"), (
        DemoAction("open_ticket", "Open a ticket for a customer email",
                   _schema({"subject": STR, "body": STR, "priority": {"enum": ["low", "normal", "high"]}},
                           ["subject", "body"]),
                   "demo-helpdesk", "create_ticket",
                   {"subject": "$.subject", "body": "$.body", "priority": "$.priority"}),
        DemoAction("reply_to_customer", "Answer the customer", _schema({"ticket_id": STR, "message": STR},
                                                                       ["ticket_id", "message"]),
                   "demo-helpdesk", "post_reply", {"ticket": "$.ticket_id", "text": "$.message"}),
        DemoAction("escalate", "Hand the ticket to another team", _schema({"ticket_id": STR, "team": STR},
                                                                          ["ticket_id", "team"]),
                   "demo-helpdesk", "assign_ticket", {"ticket": "$.ticket_id", "team": "$.team"}),
        DemoAction("refund_order", "Refund an order", _schema({"order_id": STR, "amount_cents": INT}, ["order_id"]),
                   "demo-payments", "refund_charge", {"order": "$.order_id", "amount_cents": "$.amount_cents"}),
    )),
    DemoSuite("demo-travel", "Travel booking", "Find, book and cancel flights for a traveller.",
              "travel.example", ("flights", "offer", "booking"),
              ("#origin", "#destination", "input[type=date]", "button.book", "button.cancel"), (
        DemoAction("search_flights", "Search flights", _schema({"from": STR, "to": STR, "date": STR}, ["from", "to"]),
                   "demo-flights", "search_flights", {"origin": "$.from", "destination": "$.to", "date": "$.date"}),
        DemoAction("book_flight", "Book an offer", _schema({"offer_id": STR, "passenger": STR},
                                                           ["offer_id", "passenger"]),
                   "demo-flights", "book", {"offer": "$.offer_id", "passenger": "$.passenger"}),
        DemoAction("cancel_booking", "Cancel a booking", _schema({"booking_id": STR}, ["booking_id"]),
                   "demo-flights", "cancel", {"booking": "$.booking_id"}),
    )),
)


# --- conversations -----------------------------------------------------------------------------

def _call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def _result(call_id: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)}


def _checkout(rng: random.Random) -> list[dict[str, Any]]:
    product = rng.choice(["pair of trail running shoes", "espresso machine", "USB-C hub", "rain jacket",
                          "desk lamp"])
    qty, sku, cart = rng.randint(1, 3), f"SKU-{rng.randint(10000, 99999)}", f"cart_{rng.randint(1000, 9999)}"
    price = rng.randint(1500, 24000)
    return [
        {"role": "system", "content": "You shop on shop.example for the user. Use the tools; confirm before paying."},
        {"role": "user", "content": f"I need {qty} × {product}: the cheapest in stock, with coupon WINTER10."},
        _call("c1", "search_products", {"query": product, "max_results": 5}),
        _result("c1", {"results": [{"sku": sku, "name": product.title(), "price_cents": price, "in_stock": True}]}),
        _call("c2", "add_to_cart", {"sku": sku, "quantity": qty}),
        _result("c2", {"cart_id": cart, "items": qty, "total_cents": price * qty}),
        _call("c3", "apply_coupon", {"cart_id": cart, "code": "WINTER10"}),
        _result("c3", {"cart_id": cart, "total_cents": price * qty * 9 // 10}),
        {"role": "assistant", "content": f"Your cart holds {qty} × {product.title()}: {price * qty * 9 // 1000} "
                                         f"EUR after the coupon. Shall I pay with your saved card?"},
    ]


def _support(rng: random.Random) -> list[dict[str, Any]]:
    order = f"ORD-{rng.randint(100000, 999999)}"
    issue = rng.choice(["arrived damaged", "never arrived", "is the wrong size", "was charged twice"])
    ticket = f"T-{rng.randint(1000, 9999)}"
    return [
        {"role": "system", "content": "You triage the support inbox. Be brief and kind; refunds up to 50 EUR."},
        {"role": "user", "content": f"Customer email: my order {order} {issue}. What can you do?"},
        _call("s1", "open_ticket", {"subject": f"{order} {issue}", "body": f"Order {order} {issue}.",
                                    "priority": "high" if "charged" in issue else "normal"}),
        _result("s1", {"ticket_id": ticket}),
        _call("s2", "refund_order", {"order_id": order, "amount_cents": rng.randint(500, 5000)}),
        _result("s2", {"refund_id": f"re_{rng.randint(10**6, 10**7)}", "status": "pending"}),
        _call("s3", "reply_to_customer", {"ticket_id": ticket, "message": "Sorry about that, a refund is on its way."}),
        _result("s3", {"ok": True}),
        {"role": "assistant", "content": f"Opened {ticket}, refunded the order and told the customer."},
    ]


def _travel(rng: random.Random) -> list[dict[str, Any]]:
    origin, destination = rng.sample(["LIS", "BER", "CDG", "AMS", "MAD", "FCO", "VIE"], 2)
    day = f"2026-12-{rng.randint(1, 28):02d}"
    offer = f"off_{rng.randint(10**5, 10**6)}"
    return [
        {"role": "system", "content": "You book travel. Prefer direct flights; never book without a passenger name."},
        {"role": "user", "content": f"Get me from {origin} to {destination} on {day}, morning if possible. "
                                    "Passenger: Ada Lovelace."},
        _call("t1", "search_flights", {"from": origin, "to": destination, "date": day}),
        _result("t1", {"offers": [{"offer_id": offer, "departs": f"{day}T08:15", "stops": 0,
                                   "price_cents": rng.randint(4000, 30000)}]}),
        _call("t2", "book_flight", {"offer_id": offer, "passenger": "Ada Lovelace"}),
        _result("t2", {"booking_id": f"BK{rng.randint(10000, 99999)}", "status": "confirmed"}),
        {"role": "assistant", "content": f"Booked the 08:15 direct flight {origin}→{destination} on {day}."},
    ]


CONVERSATIONS: dict[str, Callable[[random.Random], list[dict[str, Any]]]] = {
    "demo-checkout": _checkout, "demo-support": _support, "demo-travel": _travel}


def example_jsonl(suite: DemoSuite, seed: int, lines: int) -> bytes:
    """An example file: `lines` conversations, each with the suite's actions as tools."""
    rng = random.Random(seed)
    tools = [{"type": "function", "function": {"name": a.name, "description": a.description,
                                               "parameters": a.input_schema}} for a in suite.actions]
    return b"".join(json.dumps({"messages": CONVERSATIONS[suite.slug](rng), "tools": tools}).encode() + b"\n"
                    for _ in range(lines))


def session_bundle(suite: DemoSuite, suite_id: str, index: int, key: str, now: datetime) -> bytes:
    """A recorded session of the suite's flow, `index` days and some hours ago."""
    rng = random.Random(f"{suite.slug}-{index}")
    started = (now - timedelta(days=index * 2 + 1, hours=rng.randint(0, 12))).replace(microsecond=0)
    ended = started + timedelta(minutes=rng.randint(2, 25))
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    kinds = ("navigate", "click", "keydown", "keydown", "scroll", "click")
    manifest = bundles.manifest(
        started_at=started.strftime(stamp), ended_at=ended.strftime(stamp), suite_id=suite_id,
        client={"name": "tracepipe-recorder", "version": "1.4.2", "os": rng.choice(["linux", "macos", "windows"]),
                "browser": rng.choice(["chromium 131", "firefox 133"])},
        metadata={"demo_key": key, "scenario": suite.name, "task_success": rng.random() > 0.25})
    return bundles.bundle(
        manifest_data=manifest, screenshots=rng.randint(4, 8), screenshot_size=(400, 250), screenshot_noise=True,
        events_data=bundles.events(rng.randint(800, 3000), kinds=kinds, targets=suite.targets),
        har_data=bundles.har(rng.randint(20, 80), host=suite.host, paths=suite.pages,
                             started_at=started.strftime(stamp)))


# --- loading ------------------------------------------------------------------------------------

@dataclass
class DemoReport:
    suites: list[str] = field(default_factory=list)
    actions: int = 0
    servers: int = 0
    tools: int = 0
    bindings: int = 0
    sessions: int = 0
    session_bytes: int = 0
    examples: int = 0
    models: list[str] = field(default_factory=list)
    created: int = 0  # rows this run added (0 on a re-run)
    pipeline_jobs: int = 0  # jobs the demo's pipeline worker finished in this run
    pipeline_examples: int = 0
    api_key: str = ""
    api_key_id: str = ""
    seconds: float = 0.0


def sign_in(tp: Client, email: str, password: str) -> str:
    """Logs in as the demo account, signing it up first when it does not exist. Answers how."""
    try:
        tp.login(email, password)
        return "signed in"
    except TracepipeError as e:
        if e.status != 401:
            raise
    try:
        tp.signup(email, password, DEMO_DISPLAY_NAME)
        return "signed up"
    except TracepipeError as e:
        if e.status == 409:
            raise TracepipeError(401, "TP401", f"{email} exists with another password", None,
                                 "Pass that account's --password, or another --email.") from None
        raise


def load(tp: Client, log: Log = lambda _: None) -> DemoReport:
    """Creates (or finds) the sample as the signed-in user of `tp`; see the module docstring."""
    started = time.monotonic()
    report = DemoReport(models=list(MODELS))
    me = tp.me()
    tools = _catalog(tp, me["id"], report, log)
    suite_ids = _suites(tp, tools, report, log)
    sessions = _sessions(tp, suite_ids, report, log)
    _examples(tp, suite_ids, sessions, report, log)
    _api_key(tp, report)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _catalog(tp: Client, me: str, report: DemoReport, log: Log) -> dict[tuple[str, str], tuple[str, str]]:
    """MCP servers and tools; answers (server name, tool name) → (server id, tool id)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for name, (url, transport, description, tools) in SERVERS.items():
        found = tp.list_mcp_servers({"name": f"eq.{name}"})
        if found:
            server = found[0]
        else:
            server = tp.create_mcp_server(name, url, transport, description)  # type: ignore[arg-type]
            report.created += 1
        have = {t["name"]: t["id"] for t in tp.list_tools(server["id"])}
        for tool, (tool_description, schema) in tools.items():
            if tool not in have:
                if server["created_by"] != me:
                    raise TracepipeError(409, "TP409", f"MCP server {name} belongs to another user and lacks "
                                                       f"the tool {tool}", None, "Rename or delete that server.")
                have[tool] = tp.create_tool(server["id"], tool, description=tool_description,
                                            input_schema=schema)["id"]
                report.created += 1
            out[(name, tool)] = (server["id"], have[tool])
        report.servers += 1
        report.tools += len(tools)
    log(f"MCP catalog: {report.servers} servers, {report.tools} tools")
    return out


def _suites(tp: Client, tools: dict[tuple[str, str], tuple[str, str]], report: DemoReport,
            log: Log) -> dict[str, str]:
    """Suites with their actions and bindings; answers slug → suite id."""
    ids: dict[str, str] = {}
    for spec in SUITES:
        found = tp.list_suites({"slug": f"eq.{spec.slug}"})
        if found:
            suite = found[0]
        else:
            try:
                suite = tp.create_suite(spec.name, spec.slug, spec.description)
            except TracepipeError as e:
                if e.status in (403, 409):  # 403: PostgREST checks the read policy on the returned row first
                    raise TracepipeError(409, e.code, f"the slug {spec.slug} belongs to a suite you cannot see",
                                         None, "Another account holds the demo: sign in as that one "
                                               "(--email, --password).") from None
                raise
            report.created += 1
        ids[spec.slug] = suite["id"]
        report.suites.append(spec.slug)
        actions = {a["name"]: a["id"] for a in tp.list_actions(suite["id"])}
        bound = {(m["action_id"], m["tool_id"]) for m in tp.list_action_tool_maps(suite["id"])}
        for action in spec.actions:
            if action.name not in actions:
                actions[action.name] = tp.create_action(suite["id"], action.name, description=action.description,
                                                        input_schema=action.input_schema)["id"]
                report.created += 1
            server_id, tool_id = tools[(action.server, action.tool)]
            if (actions[action.name], tool_id) not in bound:
                tp.create_action_tool_map(suite["id"], actions[action.name], server_id, tool_id, action.mapping)
                report.created += 1
            report.actions += 1
            report.bindings += 1
    log(f"suites: {', '.join(report.suites)} ({report.actions} actions, {report.bindings} bindings)")
    return ids


def _sessions(tp: Client, suite_ids: dict[str, str], report: DemoReport, log: Log) -> dict[str, Session]:
    """Uploads the recorded sessions not uploaded before; answers demo_key → session."""
    existing: dict[str, Session] = {
        s["metadata"]["demo_key"]: s
        for s in tp.list_sessions({"metadata->>demo_key": "not.is.null", "limit": "1000"})}
    now = datetime.now(UTC)
    out: dict[str, Session] = {}
    for spec in SUITES:
        for i in range(SESSIONS_PER_SUITE):
            key = f"{spec.slug}-session-{i + 1}"
            session = existing.get(key)
            if session is None:
                data = session_bundle(spec, suite_ids[spec.slug], i, key, now)
                session = _upload_bytes(tp, data, key)
                report.created += 1
            out[key] = session
            report.sessions += 1
            report.session_bytes += session["size_bytes"]
    log(f"sessions: {report.sessions} ({report.session_bytes / 1024 / 1024:.1f} MiB of bundles)")
    return out


def _upload_bytes(tp: Client, data: bytes, key: str) -> Session:
    """The client uploads files (streamed from disk): write the bundle to a temporary one."""
    with tempfile.TemporaryDirectory(prefix="tp-demo-") as tmp:
        path = Path(tmp) / f"{key}.zip"
        path.write_bytes(data)
        return tp.upload_session(path)


def _examples(tp: Client, suite_ids: dict[str, str], sessions: dict[str, Session], report: DemoReport,
              log: Log) -> None:
    existing: dict[str, Example] = {
        e["metadata"]["demo_key"]: e
        for e in tp.list_examples({"metadata->>demo_key": "not.is.null", "limit": "1000"})}
    n = 0
    for spec in SUITES:
        for i in range(SESSIONS_PER_SUITE):
            session = sessions[f"{spec.slug}-session-{i + 1}"]
            for j in range(EXAMPLES_PER_SESSION):
                key = f"{spec.slug}-example-{i + 1}-{j + 1}"
                model = MODELS[n % len(MODELS)]
                n += 1
                if key not in existing:
                    lines = 3 + (n * 5) % 9
                    tp.register_example(suite_ids[spec.slug], model, example_jsonl(spec, n, lines),
                                        session_id=session["id"], metadata={"demo_key": key, "source": "demo"})
                    report.created += 1
                report.examples += 1
    log(f"examples: {report.examples} across {len(MODELS)} models")


def run_pipeline(pipeline: Client, suite_ids: dict[str, str], report: DemoReport, log: Log = lambda _: None) -> None:
    """A pipeline worker over the demo suites' queued jobs (every uploaded session has one):
    it downloads each session's bundle, makes one example of it and registers it with the
    job (lineage: example -> job -> session), until no job is due. A re-run finds none."""
    import zipfile

    from tracepipe.worker import Job, claim

    by_id = {suite_ids[spec.slug]: spec for spec in SUITES if spec.slug in suite_ids}
    with tempfile.TemporaryDirectory(prefix="tp-demo-pipeline-") as tmp:
        for suite_id, spec in by_id.items():
            while leases := claim(pipeline, limit=10, lease_s=60, suite_id=suite_id):
                for lease in leases:
                    job = Job(pipeline, lease, 60)
                    job.start_heartbeat()
                    with job:
                        bundle = job.download_bundle(Path(tmp) / f"{job.id}.zip")
                        with zipfile.ZipFile(bundle) as zf:
                            events = sum(1 for _ in zf.read("events.jsonl").splitlines())
                        job.register_example(MODELS[0], example_jsonl(spec, events, 2),
                                             metadata={"source": "demo pipeline", "events": events})
                    report.pipeline_jobs += 1
                    report.pipeline_examples += len(job.example_ids)
    log(f"pipeline: a worker finished {report.pipeline_jobs} jobs into {report.pipeline_examples} examples"
        if report.pipeline_jobs else "pipeline: no job due (the demo sessions were processed before)")


def _api_key(tp: Client, report: DemoReport) -> None:
    """A fresh key (the secret is only ever shown once); earlier demo keys are revoked."""
    for key in tp.list_api_keys():
        if key["name"] == DEMO_KEY_NAME and not key["revoked_at"]:
            tp.revoke_api_key(key["id"])
    created = tp.create_api_key(DEMO_KEY_NAME, access="write")
    report.api_key = created["key"]
    report.api_key_id = created["id"]
