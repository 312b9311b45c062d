"""`loyalty coupons generate`, `loyalty import offers` and `loyalty report campaign`.

They open the database the config names, beside a serving server or without one; writes go
through the same single-writer storage in short transactions, so the server keeps serving.
"""
from __future__ import annotations

import csv
import sys
from datetime import date
from pathlib import Path

import msgspec

from server import campaign_definitions, cvm, report_campaign, schema
from server.databases import CannotOpen, open_existing
from server.errors import ApiError
from server.interrupt import INTERRUPTED_STATUS, stop_between_batches
from server.reports import ProgressBar
from storage import coupons, offers
from storage.db import Database
from storage.health import StorageBusy, StorageError, is_busy
from storage.sql import unreachable_errors

COUNT_MAX = 10_000_000
OFFER_COLUMNS = ("offer_id", "rule", "card", "from", "to", "points")
OFFER_ROWS_MAX = 10_000_000


def add_parsers(sub) -> None:
    gen = sub.add_parser("coupons", help="coupon codes").add_subparsers(dest="coupons_command", required=True)
    g = gen.add_parser("generate", help="new random codes of a coupon campaign, written to a CSV file")
    g.add_argument("--campaign", required=True)
    g.add_argument("--count", required=True, type=_count)
    g.add_argument("--out", required=True, type=Path, help="a new CSV file: the only copy of the codes")
    g.add_argument("--card", help="bind every code to this card")
    g.add_argument("--config", default="config.yaml")
    imports = sub.choices.get("import") or sub.add_parser("import", help="data from files")
    kinds = (imports._subparsers._group_actions[0] if imports._subparsers
             else imports.add_subparsers(dest="import_command", required=True))
    o = kinds.add_parser("offers", help="personal offers, one card a row")
    o.add_argument("--csv", required=True, type=Path, dest="source",
                   help=f"a CSV file with a header row: {', '.join(OFFER_COLUMNS)} (points may be empty)")
    o.add_argument("--config", default="config.yaml")
    rep = sub.add_parser("report", help="reports").add_subparsers(dest="report_command", required=True)
    r = rep.add_parser("campaign", help="the effect of a rule with a control group")
    r.add_argument("rule")
    r.add_argument("--from", dest="first", help="first local date (default: the rule's period)")
    r.add_argument("--to", dest="last", help="last local date (default: the rule's period)")
    fmt = r.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    r.add_argument("--plot", type=Path, help="a PNG of spend per member by week for both groups "
                                             "(needs matplotlib: pip install -r requirements-plot.txt)")
    r.add_argument("--config", default="config.yaml")


def handles(args) -> bool:
    return args.command in ("coupons", "report") or (args.command == "import" and args.import_command == "offers")


def _count(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= COUNT_MAX:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {COUNT_MAX:,}, got {text!r}")
    return value


def dispatch(args) -> int:
    from server.admin_cli import _program, _storage_faults_unlogged
    from server.config import ConfigError, load_config
    from server.privacy import command_keys_problem, privacy_from_config
    try:
        config = load_config(args.config)
        privacy = privacy_from_config(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    program = _program(config)
    try:
        definitions = cvm.definitions_of(program)
        try:
            db = open_existing(config)
        except CannotOpen as e:
            print(e, file=sys.stderr)
            return 2
        try:
            with _storage_faults_unlogged():
                if args.command in ("coupons", "import") and (
                        refused := db.read_sync(lambda conn: command_keys_problem(conn, privacy))):
                    print(f"{_NAMES[args.command]}: {refused}; nothing was written", file=sys.stderr)
                    return 2
                if args.command == "coupons":
                    return generate(db, definitions, privacy, args.campaign, args.count, args.out, args.card,
                                    tz=program.timezone)
                if args.command == "import":
                    return import_offers(db, definitions, privacy, args.source, tz=program.timezone)
                return campaign(db, definitions, program, args)
        except Stopped as e:
            print(f"{_NAMES[args.command]}: {_fault_line(e.fault, config)}; {e.done}", file=sys.stderr)
            return 1
        finally:
            db.close()
    finally:
        program.close()


_NAMES = {"coupons": "coupons generate", "import": "import offers"}


class Stopped(Exception):
    """A storage fault (the write lock held too long, a full disk) stopped a command half way."""

    def __init__(self, done: str, fault: Exception):
        super().__init__(done)
        self.done, self.fault = done, fault


def _fault_line(e: Exception, config) -> str:
    from server import databases
    if config.database.url is None and (isinstance(e, StorageBusy) or is_busy(e)):   # SQLite's write lock
        from server.startup import lock_holder
        path = config.resolve(config.database.path)
        return (f"the database {path} is locked by {lock_holder(path)} for longer than "
                f"database.busy_wait_seconds ({config.database.busy_wait_seconds:g}s)")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"cannot write to {databases.described(config)}: {first_line}"


# ------------------------------------------------------------------ coupons

def generate(db: Database, definitions: cvm.Definitions, privacy, campaign: str, count: int, out: Path,
             card: str | None, now=None, tz=None) -> int:
    """Writes `count` new codes to `out` (refused if it exists), batch by batch: a code is in
    the file only once it is stored. tz: the program's, whose local date the campaign's
    `valid` is in."""
    from datetime import datetime, timezone
    if campaign not in definitions.coupons:
        print(f"coupons generate: {cvm.no_such('coupon campaign', campaign, definitions.coupons)}", file=sys.stderr)
        return 2
    if card is not None and (problem := _card_problem(card)):
        print(f"coupons generate: --card {problem}; nothing was generated", file=sys.stderr)
        return 2
    try:
        stream = out.open("x", newline="", encoding="utf-8")
    except FileExistsError:
        print(f"coupons generate: {out} exists; codes are never written over", file=sys.stderr)
        return 2
    except OSError as e:     # no such folder, a folder's name, no permission: before any code is made
        print(f"coupons generate: cannot create {out}: {e.strerror}; nothing was generated", file=sys.stderr)
        return 2
    now = now or datetime.now(timezone.utc)
    card_hmac = privacy.card(card) if card else None
    bar, done = ProgressBar(f"coupons {campaign}"), 0
    with stream, stop_between_batches() as stop:
        writer = csv.writer(stream)
        writer.writerow(["code", "campaign"])
        while done < count:
            if stop.requested:
                print(f"coupons generate: interrupted: {done} of {count} codes of {campaign} stored and written "
                      f"to {out}; no others were made", file=sys.stderr)
                return INTERRUPTED_STATUS
            codes = [coupons.new_code() for _ in range(min(coupons.WRITE_BATCH_CODES, count - done))]
            try:
                taken = db.write_sync(lambda conn: cvm.add_codes_for_card(conn, campaign, codes, card, card_hmac,
                                                                          privacy, now))
            except ApiError as e:       # the card was replaced or merged away: no till could present them
                if done:    # the replacement or merge moved those to the card that took its place
                    print(f"coupons generate: --card: {e.message}; {done} of {count} codes of {campaign} stored "
                          f"and written to {out}, now bound to the card that took its place; no others were made",
                          file=sys.stderr)
                    return 1
                out.unlink()
                print(f"coupons generate: --card: {e.message}; nothing was generated", file=sys.stderr)
                return 2
            except (StorageError, *unreachable_errors()) as e:
                if done:
                    raise Stopped(f"{done} of {count} codes of {campaign} stored and written to {out}; no others "
                                  "were made", e) from None
                out.unlink()        # a file of no codes would only stop the same command run again
                raise Stopped("nothing was generated", e) from None
            kept = [c for c in codes if c not in set(taken)]
            writer.writerows([c, campaign] for c in kept)
            done += len(kept)
            bar(done, count)
    for warning in cvm.coupon_warnings(definitions.coupons[campaign], now.astimezone(tz or timezone.utc).date()):
        print(f"coupons generate: warning: {warning}", file=sys.stderr)
    print(f"{count} codes of {campaign} written to {out}")
    return 0


def _card_problem(card: str) -> str | None:
    """Why --card is no card the API would take (an empty one would make codes bound to no
    card, usable with any); None when it is one."""
    try:
        msgspec.convert(card, schema.Card)
    except msgspec.ValidationError:
        return f"must be a card number of 1 to 64 characters without slashes or spaces, got {card!r}"
    return None


# ------------------------------------------------------------------ offers

class OfferRows(msgspec.Struct):
    rule: str
    first: str
    last: str
    points: str
    cards: list[str]
    lines: list[int]


def read_offers(source: Path) -> tuple[dict[str, OfferRows], list[str]]:
    """The CSV's rows grouped by offer_id, and its problems as `file:line: message`."""
    grouped: dict[str, OfferRows] = {}
    problems = []
    with source.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in OFFER_COLUMNS if c not in (reader.fieldnames or []) and c != "points"]
        if missing:
            return {}, [f"{source}:1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"]
        for n, row in enumerate(reader, start=2):
            if n > OFFER_ROWS_MAX + 1:
                problems.append(f"{source}:{n}: more than {OFFER_ROWS_MAX:,} rows")
                break
            key = (row["rule"], row["from"], row["to"], row.get("points") or "")
            offer = grouped.setdefault(row["offer_id"], OfferRows(*key, [], []))
            if (offer.rule, offer.first, offer.last, offer.points) != key:
                problems.append(f"{source}:{n}: offer {row['offer_id']} has another rule, from, to or points "
                                f"than on line {offer.lines[0]}")
            offer.cards.append(row["card"])
            offer.lines.append(n)
    return grouped, problems


def import_offers(db: Database, definitions: cvm.Definitions, privacy, source: Path, now=None, tz=None) -> int:
    """Each offer of the file is assigned whole or not at all; one refused offer leaves the others.
    tz: the program's, whose local dates the offers' are."""
    from datetime import datetime, timezone
    try:
        grouped, problems = read_offers(source)
    except OSError as e:
        print(f"import offers: cannot read {source}: {e.strerror}; nothing was assigned", file=sys.stderr)
        return 2
    except (UnicodeDecodeError, csv.Error) as e:
        print(f"import offers: {source} is not UTF-8 CSV ({e}); nothing was assigned", file=sys.stderr)
        return 2
    now = now or datetime.now(timezone.utc)
    created = repeated = 0
    warnings: list[str] = []    # taken all the same: a receipt sent late is judged at its ts
    with stop_between_batches() as stop:
        for offer_id, rows in grouped.items():
            if stop.requested:
                _print_offers_summary(problems, created, repeated, warnings)
                print(f"import offers: interrupted (Ctrl-C): offer {offer_id} (line {rows.lines[0]}) and those "
                      "after it were not assigned; run it again: an offer assigned already is not assigned twice",
                      file=sys.stderr)
                return INTERRUPTED_STATUS
            try:
                # Through the API's own decoder, so a bad cell is refused in the API's words
                # ("from must be a date like 2026-11-24"), not msgspec's.
                body = schema.decode(schema.ENCODER.encode(
                    {"offer_id": offer_id, "rule": rows.rule, "from": rows.first, "to": rows.last,
                     "cards": rows.cards, "points": _points_cell(rows.points)}), schema.OfferAssignment)
                cvm.check_offer(definitions, body)
                done = db.write_sync(lambda conn: _assign(conn, privacy, body, now))
            except (StorageError, *unreachable_errors()) as e:
                _print_offers_summary(problems, created, repeated, warnings)
                raise Stopped(f"offer {offer_id} (line {rows.lines[0]}) and those after it were not assigned; "
                              "run it again: an offer assigned already is not assigned twice", e) from None
            except (msgspec.ValidationError, ValueError) as e:
                problems.append(f"{source}:{rows.lines[0]}: offer {offer_id}: {e}")
                continue
            except ApiError as e:
                problems.append(f"{source}:{rows.lines[0]}: offer {offer_id}: {_offer_refused(e, rows)}")
                continue
            except offers.OfferConflict as e:
                problems.append(f"{source}:{rows.lines[0]}: {e}")
                continue
            created += done.created
            repeated += not done.created
            today = now.astimezone(tz or timezone.utc).date()
            warnings += [f"{source}:{rows.lines[0]}: offer {offer_id}: warning: {w}"
                         for w in cvm.offer_warnings(body, definitions.rules.get(body.rule), today)]
    _print_offers_summary(problems, created, repeated, warnings)
    return 1 if problems else 0


def _offer_refused(e: ApiError, rows: OfferRows) -> str:
    """Why an offer of the file was refused, with the file's line of each card in question."""
    if e.code == "validation_error":    # every cell in question, a card by its line
        return "; ".join(f"card on line {rows.lines[int(d['path'][6:-1])]} {d['message']}"
                         if d["path"].startswith("cards[") else f"{d['path']} {d['message']}" for d in e.details)
    # a card out of use also says which card to use instead
    where = [f"line {rows.lines[int(d['path'][6:-1])]}"
             + ("" if d["message"] == cvm.NOT_ENROLLED else f": {d['message']}")
             for d in e.details if d["path"].startswith("cards[")]
    return e.message + (f" ({', '.join(where[:20])})" if where else "")


def _points_cell(text: str) -> int | str | None:
    """An empty cell is no budget; a whole number is one; anything else is left as written for
    the decoder to refuse as not a whole number."""
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _print_offers_summary(problems: list[str], created: int, repeated: int, warnings: list[str]) -> None:
    for p in problems + warnings:
        print(p, file=sys.stderr)
    print(f"offers: {created} assigned, {repeated} already assigned the same, {len(problems)} refused")


def _assign(conn, privacy, body: schema.OfferAssignment, now):
    members = cvm.locked_members_of_cards(conn, privacy, body.cards)
    return offers.assign(conn, body.offer_id, body.rule, cvm.offer_fingerprints(privacy, body), body.from_, body.to,
                         body.points, members, now)


# ------------------------------------------------------------------ campaign report

def campaign(db: Database, definitions: cvm.Definitions, program, args) -> int:
    live = campaign_definitions.Live(program, definitions.rules)
    try:
        chosen = db.read_sync(lambda conn: campaign_definitions.choose_definition(conn, live, args.rule, args.first,
                                                                                  args.last), timeout_s=3600)
    except ApiError as e:
        # In the API's words (unknown_rule, rule_without_holdout, rule_redefined), naming the rule first.
        why = (e.message if e.code != "validation_error" else
               "; ".join(d["path"] + " " + d["message"] for d in e.details))
        print(f"report campaign: {why}", file=sys.stderr)
        return 2
    # Before the report, not after it: a report printed and then a failure reads as neither.
    matplotlib = _matplotlib() if args.plot else None
    if args.plot and matplotlib is None:
        print("report campaign: --plot needs matplotlib: .venv/bin/pip install -r requirements-plot.txt; "
              "nothing was reported", file=sys.stderr)
        return 2
    rule, setting, first, last = chosen.rule, chosen.setting, chosen.first, chosen.last
    result = chosen.described(db.read_sync(lambda conn: report_campaign.report(conn, setting, rule, first, last),
                                           timeout_s=3600))
    if args.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    elif args.csv:
        write_csv(result, sys.stdout)
        # The CSV holds the numbers only: where the definition came from is said beside it.
        for warning in result["warnings"]:
            print(f"report campaign: warning: {warning}", file=sys.stderr)
    else:
        print(text(result, program.currency))
    if args.plot:
        weeks = db.read_sync(lambda conn: report_campaign.weekly(conn, setting, rule, first, last), timeout_s=3600)
        return plot(matplotlib, weeks, rule.id, args.plot)
    return 0


def write_csv(result: dict, stream) -> None:
    writer = csv.writer(stream)
    fields = ("members", "buyers", "receipts", "spend", "scope_spend", "points")
    writer.writerow(["group", *fields])
    for group in ("treated", "control"):
        writer.writerow([group, *(result[group][f] for f in fields)])
    u = result["uplift"] or {}
    writer.writerow([])
    writer.writerow(["uplift_spend_per_member", "low", "high", "incremental_spend", "points_cost"])
    writer.writerow([u.get("spend_per_member"), u.get("low"), u.get("high"), result["incremental_spend"],
                     result["points_cost"]])


def text(result: dict, currency: str) -> str:
    lines = [f"campaign {result['rule']}, {result['from']} to {result['to']} (money in minor units of {currency})",
             f"{'':8} {'members':>9} {'buyers':>9} {'receipts':>9} {'spend':>14} {'scope_spend':>14} {'points':>9}"]
    for group in ("treated", "control"):
        g = result[group]
        lines.append(f"{group:8} {g['members']:>9} {g['buyers']:>9} {g['receipts']:>9} {g['spend']:>14} "
                     f"{g['scope_spend']:>14} {g['points']:>9}")
    u = result["uplift"]
    if u is None:
        lines.append("uplift: not known (a group has no members)")
    else:
        interval = (f"95% interval {u['low']} to {u['high']}" if u["low"] is not None
                    else "no interval (a group has fewer than two members)")
        lines.append(f"uplift of spend per member: {u['spend_per_member']} ({interval})")
        lines.append(f"incremental spend: {result['incremental_spend']}; points cost: {result['points_cost']}")
    lines += [f"warning: {warning}" for warning in result.get("warnings", ())]
    return "\n".join(lines)


def _matplotlib():
    """matplotlib, which serving does not install (requirements-plot.txt), or None."""
    try:
        import matplotlib
    except ImportError:
        return None
    return matplotlib


def plot(matplotlib, weeks: list[tuple[date, float, float]], rule_id: str, out: Path) -> int:
    matplotlib.use("Agg")
    from matplotlib import pyplot
    fig, ax = pyplot.subplots(figsize=(8, 4.5))
    days = [w[0] for w in weeks]
    ax.plot(days, [w[1] for w in weeks], marker="o", label="treated")
    ax.plot(days, [w[2] for w in weeks], marker="o", label="control")
    ax.set_title(f"{rule_id}: spend per member by week")
    ax.set_xlabel("week from (a shorter last week scaled to 7 days)")
    ax.set_ylabel("spend per member (minor units)")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out, format="png")
    pyplot.close(fig)
    print(f"chart written to {out}")
    return 0
