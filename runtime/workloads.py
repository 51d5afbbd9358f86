"""Fixed workloads for `nibble bench --speculative`: the same prompts every run, shipped with nibble.

    code_edit   a ~60-line Python function to return with type hints and docstrings (the answer repeats the
                code: prompt lookup and draft models guess most of it)
    quote       a summary asked to quote a short text (partly guessable)
    free        free-form text with nothing to copy (speculation should cost next to nothing)
"""

from __future__ import annotations

CODE = '''\
def parse_inventory(lines, default_location="warehouse", strict=False):
    items = {}
    errors = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            errors.append((number, "expected at least three fields"))
            if strict:
                raise ValueError(f"line {number}: expected at least three fields")
            continue
        sku, name, quantity = parts[0], parts[1], parts[2]
        location = parts[3] if len(parts) > 3 and parts[3] else default_location
        try:
            quantity = int(quantity)
        except ValueError:
            errors.append((number, f"quantity {quantity!r} is not a number"))
            if strict:
                raise
            continue
        if quantity < 0:
            errors.append((number, "negative quantity"))
            continue
        entry = items.setdefault(sku, {"name": name, "total": 0, "locations": {}})
        if entry["name"] != name:
            errors.append((number, f"sku {sku} has two names"))
        entry["total"] += quantity
        entry["locations"][location] = entry["locations"].get(location, 0) + quantity
    return items, errors


def low_stock(items, threshold=10):
    result = []
    for sku, entry in sorted(items.items()):
        if entry["total"] < threshold:
            result.append((sku, entry["name"], entry["total"]))
    return result


def merge_inventories(first, second):
    merged = {}
    for source in (first, second):
        for sku, entry in source.items():
            target = merged.setdefault(sku, {"name": entry["name"], "total": 0, "locations": {}})
            target["total"] += entry["total"]
            for location, quantity in entry["locations"].items():
                target["locations"][location] = target["locations"].get(location, 0) + quantity
    return merged


def format_report(items):
    lines = []
    for sku, entry in sorted(items.items()):
        places = ", ".join(f"{k}: {v}" for k, v in sorted(entry["locations"].items()))
        lines.append(f"{sku:10} {entry['name']:30} {entry['total']:6}  ({places})")
    return "\\n".join(lines)
'''

TEXT = """\
The lighthouse at Ardnamurchan Point was built between 1846 and 1849 to a design by Alan Stevenson. It \
stands on the most westerly point of the British mainland, where ships rounding the peninsula meet the full \
force of the Atlantic. The tower is thirty-six metres high and is built of pink granite quarried on the \
island of Mull. Its light was first shown in 1849 and was visible for eighteen nautical miles. Keepers \
lived at the station with their families until 1988, when the light was automated and the last keeper \
left. The keepers' cottages and the engine room now house a visitor centre, and the tower can be climbed \
on guided tours. The foghorn, installed in 1911, was sounded for the last time in 1988."""

WORKLOADS = {
    "code_edit": ("qwen2.5-coder-0.5b",
                  [{"role": "user", "content": "Add type hints and docstrings to these functions. Return the "
                                               "whole code, unchanged otherwise.\n\n```python\n" + CODE + "```"}]),
    "quote": ("smollm2-135m",
              [{"role": "user", "content": "Summarise this text, quoting its key sentences word for word.\n\n"
                                           + TEXT}]),
    "free": ("smollm2-135m",
             [{"role": "user", "content": "Write a short story about a cat who learns to play the piano."}]),
}
