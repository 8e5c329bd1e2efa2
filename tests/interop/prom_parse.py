"""Parses a Prometheus text exposition read from stdin with the official
Python client's parser (prometheus_client.parser), and prints what it
found as JSON: one object per metric family with its name, type and
samples ([name, labels, value]). Used by tests/metrics.rs, so the server's
/metrics is checked by a parser this project did not write."""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def value(v):
    # JSON has no infinities or NaN; none is expected, but say so plainly.
    if math.isinf(v) or math.isnan(v):
        return str(v)
    return v


families = []
for family in text_string_to_metric_families(sys.stdin.read()):
    families.append(
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [[s.name, s.labels, value(s.value)] for s in family.samples],
        }
    )
json.dump(families, sys.stdout)
