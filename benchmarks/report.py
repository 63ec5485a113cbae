"""How every benchmark reports: the results as JSON on stdout, and in a file when asked."""

import json
from pathlib import Path


def emit(results: dict, json_path: str | None = None) -> None:
    text = json.dumps(results, indent=2)
    print(text, flush=True)
    if json_path:
        Path(json_path).write_text(text + "\n")
