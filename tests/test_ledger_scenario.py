"""A long randomized life of the program: receipts, redemptions, holds, returns, cancels,
adjustments and lifecycle jobs over simulated months. Afterwards the audit passes, the
liability equals the sum of member balances, and every statement sums to its balance.

SCENARIO_OPS sets the length (default short for `make test`)."""
import os
import random
import shutil
from datetime import datetime, timedelta

from conftest import MARKET, connect, line, receipt
from server.jobs import run_all
from server.keys import CLOCK, DATABASE, PROGRAMS
from storage.audit import verify

OPS = int(os.environ.get("SCENARIO_OPS", "700"))
MEMBERS = 25
START = "2026-11-24T09:00:00+02:00"
CATEGORIES = ["dairy", "bakery", "grocery", "tobacco", "alcohol", "electronics"]


async def test_randomized_months_end_balanced(make_api, tmp_path):
    # Shorter windows than the shipped program so that months of simulated time see
    # activations and expiries.
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    settings = program / "program.yaml"
    settings.write_text(settings.read_text().replace("activation_delay_days: 14", "activation_delay_days: 7")
                        .replace("expiry_days: 365", "expiry_days: 60"))
    api = await make_api(now=START, program_dir=program)
    app = api.client.app
    rng = random.Random(int(os.environ.get("SCENARIO_SEED", "11")))
    for i in range(MEMBERS):
        assert (await api.post("/v1/members", {"card": f"m{i}"}))[0] == 201
    confirmed: list[dict] = []
    moment = datetime.fromisoformat(START)
    last_job_day = moment.date()
    for n in range(OPS):
        moment += timedelta(minutes=rng.randrange(1, 600))
        app[CLOCK].set(moment)
        if moment.date() != last_job_day:
            await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())
            last_job_day = moment.date()
        ts = moment.isoformat()
        roll = rng.random()
        if roll < 0.55:
            lines = [line(k + 1, rng.choice(CATEGORIES), rng.randrange(100, 80000), qty=rng.choice([1, 2, 3]))
                     for k in range(rng.randrange(1, 6))]
            body = receipt(f"r{n}", lines, card=f"m{rng.randrange(MEMBERS)}", ts=ts,
                           store=rng.choice(["S001", "S001", "F001"]), redeem=rng.choice([0, 0, 0, 15, 200]))
            as_ = "fuel" if body["store_id"] == "F001" else "register"
            if rng.random() < 0.2:
                await api.post("/v1/receipts/calculate", body, as_=as_)
            status, r = await api.post("/v1/receipts", body, as_=as_)
            assert status in (201, 422), r
            if status == 201:
                confirmed.append(body)
        elif roll < 0.7 and confirmed:
            body = rng.choice(confirmed)
            ln = rng.choice(body["lines"])
            ret = {"return_id": f"ret{n}", "store_id": body["store_id"], "register_id": "K01",
                   "receipt": {k: body[k] for k in ("store_id", "register_id", "receipt_id")},
                   "lines": [{"line_no": ln["line_no"], "qty": 1}]}
            status, r = await api.post("/v1/returns", ret, as_="fuel" if body["store_id"] == "F001" else "register")
            assert status in (201, 422), r
        elif roll < 0.77 and confirmed:
            body = confirmed.pop(rng.randrange(len(confirmed)))
            path = f"/v1/receipts/{body['store_id']}/{body['register_id']}/{body['receipt_id']}/cancel"
            status, r = await api.post(path, as_="fuel" if body["store_id"] == "F001" else "register")
            assert status == 200, r
        else:
            status, r = await api.post("/v1/admin/adjustments", {
                "card": f"m{rng.randrange(MEMBERS)}", "points": rng.choice([300, 50, -40]), "reason": "scenario",
                "adjustment_id": f"adj{n}"})
            assert status in (201, 422), r
    await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())

    conn = connect(tmp_path / "loyalty.db")
    report = verify(conn)
    assert report.ok, report.problems
    assert report.postings > OPS
    total = 0
    for i in range(MEMBERS):
        _, m = await api.get(f"/v1/members/m{i}")
        held_total = m["balance"]["available"] + m["balance"]["pending"] + m["balance"]["held"]
        total += held_total
        _, st = await api.get(f"/v1/members/m{i}/statement?limit=1000")
        postings = st["postings"]
        assert sum(p["points"] for p in postings) == held_total
        assert postings[0]["running_balance"] == held_total
    assert total == report.liability
    assert report.liability + sum(report.accounts.values()) == 0
    assert conn.execute("SELECT COUNT(*) FROM postings WHERE kind = 'expiry'").fetchone()[0] > 0
