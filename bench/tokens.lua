-- wrk script for bench/run: POSTs /api/v1/auth/ensure-user with a rotating pool of bearer
-- tokens (one per line in the file given after `--`), so every request names a user and the
-- server never sees the same token twice in a row.
--
--   wrk -t2 -c64 -d10s --latency -s bench/tokens.lua http://127.0.0.1:PORT -- tokens.txt [THREADS] [BODY]
--
-- BODY is the request's shape: `empty` (default; no body, no Content-Type, as curl or a
-- server-side caller sends it) or `json` (body `{}` with `Content-Type: application/json`,
-- as the platform's web client, axios, sends it).
--
-- Each thread starts at its own offset in the pool. Requests are pre-formatted once in
-- init(), so the client spends its CPU on sockets, not on Lua. Statuses are counted per
-- thread in response(); done() sums them and prints one machine-readable line:
--   BENCH_RESULT requests=… seconds=… rps=… p50_us=… p99_us=… p999_us=… max_us=… non2xx=…
--                s200=… s202=… errors=…
-- (p99.9 from wrk's latency histogram in done(): `latency:percentile(99.9)`; wrk --latency
-- itself prints no finer percentile than 99%.)

local path = "/api/v1/auth/ensure-user"
local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local file = args[1] or "tokens.txt"
   local nthreads = tonumber(args[2] or "2")
   local shape = args[3] or "empty"
   if shape ~= "empty" and shape ~= "json" then
      error("body shape must be empty or json, not " .. shape)
   end
   local reqs = {}
   for line in io.lines(file) do
      if #line > 0 then
         if shape == "json" then
            reqs[#reqs + 1] = wrk.format("POST", path, {
               ["Authorization"] = "Bearer " .. line,
               ["Content-Type"] = "application/json",
            }, "{}")
         else
            reqs[#reqs + 1] = wrk.format("POST", path, { ["Authorization"] = "Bearer " .. line })
         end
      end
   end
   if #reqs == 0 then
      error("no tokens in " .. file)
   end
   pool = reqs
   n = #reqs
   idx = (id * math.floor(n / nthreads)) % n
   non2xx = 0
   s200 = 0
   s202 = 0
end

function request()
   idx = idx + 1
   if idx > n then idx = 1 end
   return pool[idx]
end

function response(status, headers, body)
   if status == 200 then
      s200 = s200 + 1
   elseif status == 202 then
      s202 = s202 + 1
   elseif status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local non, ok200, ok202 = 0, 0, 0
   for _, thread in ipairs(threads) do
      non = non + (thread:get("non2xx") or 0)
      ok200 = ok200 + (thread:get("s200") or 0)
      ok202 = ok202 + (thread:get("s202") or 0)
   end
   local e = summary.errors
   local errors = e.connect + e.read + e.write + e.timeout
   local seconds = summary.duration / 1e6
   io.write(string.format(
      "BENCH_RESULT requests=%d seconds=%.3f rps=%.1f p50_us=%d p99_us=%d p999_us=%d max_us=%d non2xx=%d s200=%d s202=%d errors=%d\n",
      summary.requests, seconds, summary.requests / seconds,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
      non, ok200, ok202, errors))
end
