"""Dataset import speed: 100,000 CSV rows parsed, validated and written with COPY on the embedded PostgreSQL.

Prints the wall time of parsing alone and of the whole import against the target (< 5 s), with a row-by-row
INSERT baseline measured on a sample in the same run for the ratio. Uses a throwaway database on the configured
server (embedded by default). Run: .venv/bin/python bench/datasets_import.py [N]
"""

from __future__ import annotations

import csv
import io
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import datasets, db  # noqa: E402
from core.config import load_settings  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
BASELINE_SAMPLE = 2_000
TARGET_S = 5.0


def make_csv(n: int) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["question", "context", "expected", "tags", "metadata"])
    for i in range(n):
        writer.writerow([f"What is {i} plus {i}?", f"Arithmetic drill number {i}, shown to learner {i % 97}.",
                         str(2 * i), "math, drill" if i % 3 else "math", f'{{"source": "gen", "n": {i}}}'])
    return out.getvalue().encode()


def main() -> None:
    server = db.admin_url(load_settings())   # a throwaway database on the configured server
    name = f"bench_import_{uuid.uuid4().hex[:10]}"
    db.create_database(server, name)
    url = db.with_database(server, name)
    pool = db.open_pool(url, min_size=1, max_size=2)
    try:
        with pool.connection() as conn:
            db.migrate(conn)
        data = make_csv(N)
        started = time.perf_counter()
        parsed = datasets.parse_file(data, fmt="csv")
        parse_s = time.perf_counter() - started
        started = time.perf_counter()
        report = datasets.import_file(pool, "bench", data, fmt="csv")
        total_s = time.perf_counter() - started
        assert report.imported == N and not report.rejected, report.summary()
        assert datasets.count_items(pool, "bench") == N
        # Baseline: the same items written one INSERT pair at a time (on a sample, scaled up).
        sample = parsed.items[:BASELINE_SAMPLE]
        datasets.create_dataset(pool, "baseline")
        started = time.perf_counter()
        with pool.connection() as conn, conn.transaction():
            dataset_id = conn.execute("SELECT id FROM datasets WHERE name = 'baseline'").fetchone()[0]
            for item in sample:
                item_id = conn.execute("INSERT INTO dataset_items (dataset_id) VALUES (%s) RETURNING id",
                                       (dataset_id,)).fetchone()[0]
                conn.execute("INSERT INTO dataset_item_revisions (item_id, revision, input, expected, tags, metadata) "
                             "VALUES (%s, 1, %s::jsonb, %s, %s, %s::jsonb)",
                             (item_id, datasets.json.dumps(item.input), item.expected, list(item.tags),
                              datasets.json.dumps(item.metadata)))
        baseline_s = (time.perf_counter() - started) * N / len(sample)
        print(f"rows: {N:,}  file: {len(data) / 1e6:.1f} MB")
        print(f"parse + validate alone: {parse_s:.2f} s")
        print(f"import (parse + validate + COPY, one transaction): {total_s:.2f} s "
              f"({N / total_s:,.0f} rows/s) — target < {TARGET_S:.0f} s: {'met' if total_s < TARGET_S else 'MISSED'}")
        print(f"row-by-row INSERT baseline (scaled from {len(sample):,}): {baseline_s:.2f} s")
        print(f"ratio baseline / ours: {baseline_s / total_s:.1f}x")
    finally:
        pool.close()
        db.drop_database(server, name)


if __name__ == "__main__":
    main()
