-- wrk script for `make bench`: POST RETM-shaped bodies, each with a unique `reference`.
--
-- usage: wrk -s bench/retm.lua URL -- FIXTURE TOKEN RUN_ID
--   FIXTURE: a RETM example body (tests/fixtures/order.created.json); its "reference" value is
--            replaced per request by RUN_ID-<thread>-4000-8000-<counter> (UUID-shaped, unique
--            across threads, and across runs when RUN_ID is).
--   TOKEN:   the Bearer token sent in Authorization ("-" sends none).
-- Every answer that is not 2xx is counted per status; done() prints one line
-- "WRK_JSON {...}" with counts, errors and latency percentiles (microseconds).

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  local fixture, token = args[1], args[2]
  run_id = args[3]
  local f = assert(io.open(fixture, "rb"))
  local text = f:read("*a")
  f:close()
  local s, e = text:find('"reference": "[^"]*"')
  assert(s, "the fixture has no \"reference\" field")
  prefix = text:sub(1, s - 1) .. '"reference": "'
  suffix = '"' .. text:sub(e + 1)
  req_headers = { ["Content-Type"] = "application/json" }
  if token ~= "-" then
    req_headers["Authorization"] = "Bearer " .. token
  end
  counter = 0
  non2xx = 0
  statuses = {}
end

function request()
  counter = counter + 1
  local reference = string.format("%s-%04x-4000-8000-%012x", run_id, tid, counter)
  return wrk.format("POST", nil, req_headers, prefix .. reference .. suffix)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad, codes = 0, {}
  for _, t in ipairs(threads) do
    bad = bad + t:get("non2xx")
    for code, n in pairs(t:get("statuses")) do
      codes[code] = (codes[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(codes) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  local e = summary.errors
  io.write("WRK_JSON ", string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"statuses":{%s},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}',
    summary.requests, summary.duration, summary.bytes, bad, table.concat(parts, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max), "\n")
end
