-- wrk workload for todo-api. bench/run.py prepends a generated header that defines:
--   users = { {id = "bench-user-1", auth = "Bearer …", tasks = {1, 2, …}}, … }
--   MODE  = "read" | "write" | "mixed" | "get"
-- Each request goes to the next user in rotation, with that user's own token.
--   read:  70% GET one task, 30% GET the list
--   write: 25% each of POST (create), PUT (update), PATCH …/complete, DELETE
--   mixed: 80% read (as above), 20% write (as above)
--   get:   100% GET one task (the slow-link measurement)
--   healthz: GET /healthz only (the HTTP stack without database work, for comparison)
-- Updates and completes hit the seeded tasks; deletes remove tasks this thread created (from
-- the Location of its own 201s), so no request can meet a 404. A delete with nothing of its
-- own to delete yet is sent as a create instead (and counted as one).
-- done() prints one "BENCH key=value …" line that run.py parses.
-- Only the workloads with writes define response(): for a script that has one, wrk copies every
-- response's headers and body into Lua, which costs the shared machine's CPU (bench/RESULTS.md).
-- The others' non-2xx are counted by run.py from wrk's status errors and the service's access
-- log.

local threads = {}
local counter = 0
local created = {}
local head, tail = 1, 0
local by_id = {}
local json = { ["Content-Type"] = "application/json" }

non2xx = 0
last_bad_status = 0
ops_get, ops_list, ops_create, ops_update, ops_complete, ops_delete = 0, 0, 0, 0, 0, 0

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(7919 * (thread_index + 1))
  counter = thread_index * 37
  for _, u in ipairs(users) do
    by_id[u.id] = u
  end
end

local function next_user()
  counter = counter + 1
  return users[(counter % #users) + 1]
end

local function headers_for(u, with_body)
  local h = { Authorization = u.auth }
  if with_body then
    h["Content-Type"] = json["Content-Type"]
  end
  return h
end

local function seeded_task(u)
  return "/api/" .. u.id .. "/tasks/" .. u.tasks[math.random(#u.tasks)]
end

local function get_one()
  local u = next_user()
  ops_get = ops_get + 1
  return wrk.format("GET", seeded_task(u), headers_for(u, false))
end

local function list()
  local u = next_user()
  ops_list = ops_list + 1
  return wrk.format("GET", "/api/" .. u.id .. "/tasks", headers_for(u, false))
end

local function create()
  local u = next_user()
  ops_create = ops_create + 1
  local body = '{"title":"bench task","description":"created by the benchmark"}'
  return wrk.format("POST", "/api/" .. u.id .. "/tasks", headers_for(u, true), body)
end

local function update()
  local u = next_user()
  ops_update = ops_update + 1
  local body = '{"title":"bench task, updated ' .. counter .. '","completed":false}'
  return wrk.format("PUT", seeded_task(u), headers_for(u, true), body)
end

local function complete()
  local u = next_user()
  ops_complete = ops_complete + 1
  return wrk.format("PATCH", seeded_task(u) .. "/complete", headers_for(u, false))
end

local function delete()
  if head > tail then
    return create()
  end
  local path = created[head]
  created[head] = nil
  head = head + 1
  local owner = by_id[string.match(path, "^/api/([^/]+)/tasks/")]
  ops_delete = ops_delete + 1
  return wrk.format("DELETE", path, headers_for(owner, false))
end

local function read_op()
  if math.random() < 0.7 then
    return get_one()
  end
  return list()
end

local writes = { create, update, complete, delete }

local function write_op()
  return writes[math.random(4)]()
end

function request()
  if MODE == "read" then
    return read_op()
  elseif MODE == "write" then
    return write_op()
  elseif MODE == "healthz" then
    return wrk.format("GET", "/healthz")
  elseif MODE == "mixed" then
    if math.random() < 0.8 then
      return read_op()
    end
    return write_op()
  end
  return get_one()
end

local function on_response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    last_bad_status = status
  end
  if status == 201 then
    local location = headers["location"] or headers["Location"]
    if location then
      tail = tail + 1
      created[tail] = location
    end
  end
end

if MODE == "write" or MODE == "mixed" then
  response = on_response
end

function done(summary, latency, requests)
  local totals = { non2xx = 0, get = 0, list = 0, create = 0, update = 0, complete = 0, delete = 0 }
  local bad = 0
  for _, t in ipairs(threads) do
    totals.non2xx = totals.non2xx + t:get("non2xx")
    totals.get = totals.get + t:get("ops_get")
    totals.list = totals.list + t:get("ops_list")
    totals.create = totals.create + t:get("ops_create")
    totals.update = totals.update + t:get("ops_update")
    totals.complete = totals.complete + t:get("ops_complete")
    totals.delete = totals.delete + t:get("ops_delete")
    if t:get("last_bad_status") ~= 0 then
      bad = t:get("last_bad_status")
    end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f"
      .. " mean_us=%.1f non2xx=%d last_bad_status=%d err_connect=%d err_read=%d"
      .. " err_write=%d err_timeout=%d err_status=%d get=%d list=%d create=%d update=%d"
      .. " complete=%d delete=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, totals.non2xx, bad, e.connect, e.read,
    e.write, e.timeout, e.status, totals.get, totals.list, totals.create, totals.update,
    totals.complete, totals.delete))
end
