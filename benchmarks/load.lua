-- wrk script: confirms realistic receipts, each with a receipt id used once, and now and
-- then returns a line of a receipt this thread confirmed earlier.
--
--   wrk -t1 -c32 -d20s -s benchmarks/load.lua http://127.0.0.1:PORT \
--       -- TEMPLATES MEMBERS RUN_TAG KEY [RATE_PER_THREAD] [RETURN_SHARE]
--
-- TEMPLATES: lines "KIND|JSON" from benchmarks/receipts.py (@RID@, @CARD@ placeholders).
-- MEMBERS: enrolled cards are 7 + member id (1..MEMBERS) in 12 digits; unknown ones 9...
-- RUN_TAG: makes receipt ids unique across runs against one database.
-- RATE_PER_THREAD: requests per second this thread sends (0: as fast as it can). Sends
--   follow a fixed schedule; a send that is late goes out as soon as a connection is free.
-- Prints one line "BENCH_JSON {...}" with counts by outcome and the latency distribution.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, clock)
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

local threads = {}
local thread_no = 0

function setup(thread)
  thread_no = thread_no + 1
  thread:set("tid", thread_no)
  table.insert(threads, thread)
end

local heads, mids, tails, kinds, stores, registers = {}, {}, {}, {}, {}, {}
local members, tag, interval, return_share = 1, "run", 0, 0.02
local counter, next_slot = 0, nil
local confirmed = {}          -- ring of {seq, store, register, receipt_id} eligible for a return
local ring_head, ring_tail = 1, 0
local RETURN_AFTER = 200      -- requests later, so the receipt surely was answered

-- outcome counters, read by done() through thread:get
sent, ok_receipt, ok_return, replayed, unknown_card, redeem_refused, not_found, other = 0, 0, 0, 0, 0, 0, 0, 0
statuses = {}

function init(args)
  local path = args[1]
  members = tonumber(args[2])
  tag = args[3]
  local key = args[4]
  local rate = tonumber(args[5] or "0")
  return_share = tonumber(args[6] or "0.02")
  -- Each body is cut once around its placeholders, so a request is three concatenations.
  for line in io.lines(path) do
    local n = #kinds + 1
    local body = string.sub(line, 3)
    local rid_at = string.find(body, "@RID@", 1, true)
    local card_at = string.find(body, "@CARD@", 1, true)
    kinds[n] = string.sub(line, 1, 1)
    heads[n] = string.sub(body, 1, rid_at - 1)
    if card_at then
      mids[n] = string.sub(body, rid_at + 5, card_at - 1)
      tails[n] = string.sub(body, card_at + 6)
    else
      mids[n] = string.sub(body, rid_at + 5)
      tails[n] = nil
    end
    stores[n] = string.match(body, '"store_id":"([^"]+)"')
    registers[n] = string.match(body, '"register_id":"([^"]+)"')
  end
  math.randomseed(tid * 7919 + os.time())
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. key
  if rate > 0 then
    interval = 1000 / rate
    delay = function()
      local t = now_ms()
      if next_slot == nil then next_slot = t end
      local slot = next_slot
      next_slot = next_slot + interval
      if slot <= t then return 0 end
      return math.floor(slot - t)
    end
  end
end

local function new_id()
  counter = counter + 1
  return tag .. "-" .. tid .. "-" .. counter
end

local function a_return()
  local entry = confirmed[ring_head]
  confirmed[ring_head] = nil
  ring_head = ring_head + 1
  local body = '{"return_id":"' .. new_id() .. '","store_id":"' .. entry[2] .. '","register_id":"' .. entry[3] ..
      '","receipt":{"store_id":"' .. entry[2] .. '","register_id":"' .. entry[3] .. '","receipt_id":"' ..
      entry[4] .. '"},"lines":[{"line_no":1,"qty":1}]}'
  return wrk.format(nil, "/v1/returns", nil, body)
end

function request()
  sent = sent + 1
  if ring_head <= ring_tail and confirmed[ring_head][1] + RETURN_AFTER <= counter and math.random() < return_share then
    return a_return()
  end
  local n = math.random(#kinds)
  local kind = kinds[n]
  local rid = new_id()
  local body
  if kind == "a" then
    body = heads[n] .. rid .. mids[n]
  elseif kind == "u" then
    body = heads[n] .. rid .. mids[n] .. string.format("9%012d", math.random(1, 999999999)) .. tails[n]
  else
    body = heads[n] .. rid .. mids[n] .. string.format("7%012d", math.random(1, members)) .. tails[n]
  end
  if kind == "m" then
    ring_tail = ring_tail + 1
    confirmed[ring_tail] = { counter, stores[n], registers[n], rid }
  end
  return wrk.format(nil, "/v1/receipts", nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 201 then
    if string.sub(body, 1, 10) == '{"return":' then ok_return = ok_return + 1 else ok_receipt = ok_receipt + 1 end
  elseif status == 200 then
    replayed = replayed + 1
  elseif status == 422 then
    if string.find(body, '"unknown_card"', 1, true) then
      unknown_card = unknown_card + 1
    elseif string.find(body, '"receipt_not_found"', 1, true) then
      not_found = not_found + 1
    elseif string.find(body, 'insufficient_points', 1, true) or string.find(body, 'below_min_redemption', 1, true) then
      redeem_refused = redeem_refused + 1
    else
      other = other + 1
    end
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local totals = { ok_receipt = 0, ok_return = 0, replayed = 0, unknown_card = 0, redeem_refused = 0,
                   not_found = 0, other = 0 }
  local by_status = {}
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + (thread:get(name) or 0)
    end
    local s = thread:get("statuses") or {}
    for code, count in pairs(s) do
      by_status[tostring(code)] = (by_status[tostring(code)] or 0) + count
    end
  end
  local parts = {}
  for name, value in pairs(totals) do
    parts[#parts + 1] = string.format('"%s":%d', name, value)
  end
  local codes = {}
  for code, count in pairs(by_status) do
    codes[#codes + 1] = string.format('"%s":%d', code, count)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d},%s,"statuses":{%s},"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,' ..
    '"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ","), table.concat(codes, ","),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
