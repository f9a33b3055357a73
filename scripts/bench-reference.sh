#!/usr/bin/env bash
# The reference runs of README's "Performance" section, in one go on one machine:
#   1. the broker alone: a plain consumer of the input topic, rate swept up;
#   2. urbanstream through the same broker, windowed query, rate swept up;
#   3. urbanstream through the same broker, stateless query, rate swept up;
#   4. the whole pipeline in process, without a broker (criterion).
# Reports go to target/bench/reference/<run>/latency.{json,svg}; the summary table is printed
# at the end. Pass --brokers HOST:PORT to use a real Kafka instead of the embedded broker.
#
#   scripts/bench-reference.sh [--brokers HOST:PORT] [extra `urbanstream bench` options]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
out=target/bench/reference
mkdir -p "$out"
common=(--sweep --rate "${RATE:-10000}" --sweep-factor "${FACTOR:-1.5}" --duration "${DURATION:-10s}")

run() {
    local name=$1
    shift
    echo "== $name" >&2
    target/release/urbanstream --log error bench "${common[@]}" "$@" --out "$out/$name" \
        | tee "$out/$name.txt"
}

run broker-alone --consumer plain "$@"
run engine-window --query window "$@"
run engine-filter --query filter "$@"

echo "== in-process pipeline (criterion)" >&2
cargo bench -p urbanstream-benches --bench pipeline -- --warm-up-time 1 --measurement-time 5 \
    2>/dev/null | tee "$out/pipeline.txt" | grep -E "^pipeline|time:|thrpt:" || true

python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def best(name):
    r = json.loads((out / name / "latency.json").read_text())
    ok = [s for s in r["steps"] if s["passed"]]
    return r, (max(ok, key=lambda s: s["offered_rate"]) if ok else None)
broker, b = best("broker-alone")
ceiling = b["offered_rate"] if b else None
print("\n| run | highest sustainable rate (p99 ≤ bound) | share of broker alone | p50 / p99 / p99.9 ms at that rate | engine CPU µs/event |")
print("|---|---|---|---|---|")
for name in ["broker-alone", "engine-window", "engine-filter"]:
    r, s = best(name)
    if s is None:
        print(f"| {name} | none | - | - | - |")
        continue
    e = s["end_to_end"]
    share = f"{s['offered_rate'] / ceiling:.0%}" if ceiling else "-"
    cpu = s.get("engine_cpu_us_per_event")
    print(f"| {name} | {s['offered_rate']} ev/s | {share} | {e['p50_us']/1e3:.1f} / {e['p99_us']/1e3:.1f} / {e['p999_us']/1e3:.1f} | {cpu:.2f} |" if cpu else
          f"| {name} | {s['offered_rate']} ev/s | {share} | {e['p50_us']/1e3:.1f} / {e['p99_us']/1e3:.1f} / {e['p999_us']/1e3:.1f} | - |")
PY
