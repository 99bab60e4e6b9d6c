-- wrk script of the benchmarks: method, headers and body come from the environment
-- (BENCH_METHOD, BENCH_HEADERS as "Name: value" lines, BENCH_BODY_FILE), and at the end one
-- line "WRKJSON {...}" reports requests, errors and latency percentiles (microseconds).

wrk.method = os.getenv("BENCH_METHOD") or "GET"

for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
    local name, value = line:match("^([^:]+):%s*(.*)$")
    if name then
        wrk.headers[name] = value
    end
end

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
    local f = assert(io.open(body_file, "rb"))
    wrk.body = f:read("*a")
    f:close()
end

done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
        '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
