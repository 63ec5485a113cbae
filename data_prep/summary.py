"""A prep run's summary as the job prints it: the shards, the rows in and out, the throughput and
the funnel (for every drop reason, how many rows it saw and dropped), and the cache's buckets."""

from data_prep.filters import funnel


def format_summary(summary: dict) -> str:
    seconds = max(summary.get("seconds", 0.0), 1e-9)
    lines = [
        f"cache            {summary['cache']}",
        f"source shards    {summary['shards_new']} new of {summary['shards_total']}",
        f"rows in / out    {summary['rows_in']} / {summary['rows_written']}",
        f"throughput       {summary['rows_in'] / seconds:.1f} images/s over {seconds:.1f} s",
    ]
    if summary["dropped"]:
        lines.append("dropped          reason                  seen    dropped")
        for row in funnel(summary["dropped"], summary["rows_in"]):
            lines.append(f"                 {row['reason']:<22} {row['seen']:>6} {row['dropped']:>10}")
    manifest = summary.get("manifest")
    if manifest:
        lines.append(f"cache holds      {manifest['rows_written']} rows from {len(manifest['shards'])} shards")
        for bucket, info in manifest.get("buckets", {}).items():  # aspect-ratio buckets: each one's rows
            lines.append(f"  bucket {bucket:<9} {info['rows']:>6} rows")
    return "\n".join(lines)
